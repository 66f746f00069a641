//! The rows of the state table in `docs/rollout.md` ("State machine"), one variant each.
//! [`super::decide`] reports the rows it took in [`super::Decision::rows`], in order, so that a
//! test can tell which paths of the table it exercised. A test in `tests.rs` checks that the
//! table in the docs lists exactly these identifiers, in this order.

macro_rules! rows {
    ($($(#[$doc:meta])* $name:ident => $desc:literal,)+) => {
        /// One row of the state table in `docs/rollout.md`. The identifier is the variant's name.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Row {
            $($(#[$doc])* $name,)+
        }

        impl Row {
            /// Every row, in the order of the table.
            pub const ALL: &'static [Row] = &[$(Row::$name,)+];

            /// The identifier shown in the table's first column.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Row::$name => stringify!($name),)+
                }
            }

            /// A short description: the phase, the condition and where it leads.
            pub const fn description(self) -> &'static str {
                match self {
                    $(Row::$name => $desc,)+
                }
            }
        }
    };
}

rows! {
    NewRevision => "(none)/UpToDate: status.revision differs from spec.revision -> Staging",
    UpToDateReleaseSlot => "UpToDate holding a slot: uncordon what nixroll cordoned, drop the slot once observed",
    UpToDateIdle => "UpToDate: runs spec.revision -> UpToDate",
    Staged => "Staging: the agent staged the target -> Waiting",
    AlreadyRunning => "Staging: the staged system already runs, no slot -> UpToDate",
    AlreadyRunningHoldsSlot => "Staging: the staged system already runs, holds a slot -> Verifying",
    StageFailed => "Staging: stage error for the target -> Degraded (StageFailed)",
    StagingWaitBuilder => "Staging: waiting for the builder to build the target -> Staging",
    StagingTimeout => "Staging: staging timeout -> Degraded (StagingTimeout)",
    StagingWait => "Staging: waiting for the agent -> Staging",
    /// Also taken from `Staging` without a target (a node first seen while its Node was missing).
    TargetChanged => "Staging/Waiting: the spec wants another target -> Staging",
    WaitingReleaseSlot => "Waiting after a drain Abort: uncordon, drop the slot once observed",
    WaitingHeld => "Waiting: not admitted, window closed, suspended, backoff or invalid spec -> Waiting",
    Admitted => "Waiting: admitted, no slot -> Draining (slot, Cordon, Evict)",
    /// A retried node that stayed cordoned (`admit` lists it first, without using budget).
    Readmitted => "Waiting: admitted while holding its slot -> Draining (slot kept)",
    DrainPass => "Draining: pods remain, before the drain timeout -> Draining (Evict)",
    DrainAbort => "Draining: drain timeout, onTimeout Abort -> Waiting (backoff)",
    DrainForce => "Draining: drain timeout, onTimeout Force -> Draining (ForceDelete)",
    Drained => "Draining: no pods left, cordoned -> Activating (grant)",
    Switched => "Activating: report Switched -> Verifying",
    RebootRequested => "Activating: report RebootRequested or Rebooted -> Rebooting",
    NeedsReboot => "Activating: report NeedsReboot, reboot IfNeeded/Always -> Activating (Boot grant)",
    NeedsRebootNever => "Activating: report NeedsReboot, reboot Never -> Verifying",
    ActivationFailed => "Activating/Rebooting: report Failed -> Degraded (ActivationFailed)",
    ActivationTimeout => "Activating: activation timeout -> Degraded (ActivationTimeout)",
    ActivatingWait => "Activating: waiting for the agent's report -> Activating",
    Rebooted => "Rebooting: a new boot id -> Verifying",
    RebootTimeout => "Rebooting: reboot timeout -> Degraded (RebootTimeout)",
    RebootingWait => "Rebooting: waiting for a new boot id -> Rebooting",
    Verified => "Verifying: the target runs, the Node is Ready and every post-gate passed -> UpToDate",
    BootedWrongSystem => "Verifying: new boot into another system -> Degraded (BootedWrongSystem)",
    /// The agent booted the new system once (`bootOnce` in its report); the default is still the old one.
    BlessGranted => "Verifying: booted once into the target, Node Ready -> Verifying (Bless grant)",
    Blessed => "Verifying: report Blessed, the target runs, Node Ready, post-gates passed -> UpToDate",
    /// The post-gates: the pool's (or the cluster default) health gates, the node's own pods,
    /// and on a k3s server the built-in etcd voter gate; a pass counts only when evaluated
    /// after `slot.verifiedAt`.
    PostGateWait => "Verifying: verified, a post-gate has not passed since, before its timeout -> Verifying (cordoned)",
    PostGateFailed => "Verifying: verified, a post-gate still blocks at its timeout -> Degraded (GateFailed)",
    BlessFailed => "Verifying: the Bless grant failed -> Degraded (ActivationFailed)",
    RolledBack => "Verifying: the one-time boot ended on the old default -> Degraded (RolledBack)",
    RebootedBeforeBless => "Verifying: a new boot before Blessed, not into the target -> Degraded (RolledBack)",
    VerifyTimeout => "Verifying: verify timeout -> Degraded (VerifyTimeout)",
    VerifyingWait => "Verifying: waiting for the agent or the Node -> Verifying",
    RetryRequested => "Degraded: a new nixroll.io/retry value -> Staging",
    NewTarget => "Degraded: the spec wants another target (revision or configuration) -> Staging",
    DegradedHeld => "Degraded: otherwise -> Degraded",
    NodeMissing => "any: the Node does not exist -> unchanged",
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
