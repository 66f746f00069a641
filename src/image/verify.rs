//! Reading back what was written: type, mode, owner, size and content of every secret (the
//! content is compared here, in memory; no hash of it is ever computed or printed) and of
//! every directory nixroll created.

use super::ImageError;
use super::ext4::{Ext4Image, Node};
use super::secret::{DIR_MODE, Secret};

pub fn written(ext: &Ext4Image, secrets: &[Secret], created_dirs: &[String]) -> Result<(), ImageError> {
    for dir in created_dirs {
        match ext.stat(dir)? {
            Node::Directory { mode, uid: 0, gid: 0 } if mode == DIR_MODE => {}
            other => {
                return Err(ImageError::Verify {
                    dest: dir.clone(),
                    detail: format!("expected a directory 0700 0:0, found {}", describe(&other)),
                });
            }
        }
    }
    for s in secrets {
        let want = Node::Regular {
            mode: s.spec.mode,
            uid: s.spec.uid,
            gid: s.spec.gid,
            size: s.content.len() as u64,
            links: 1,
        };
        let got = ext.stat(&s.spec.dest)?;
        if got != want {
            return Err(ImageError::Verify {
                dest: s.spec.dest.clone(),
                detail: format!("expected {}, found {}", describe(&want), describe(&got)),
            });
        }
        let back = ext.read(&s.spec.dest)?;
        if back != s.content {
            return Err(ImageError::Verify {
                dest: s.spec.dest.clone(),
                detail: "the content read back differs from the source".into(),
            });
        }
    }
    Ok(())
}

fn describe(n: &Node) -> String {
    match n {
        Node::Missing => "nothing".into(),
        Node::Directory { mode, uid, gid } => format!("a directory {mode:04o} {uid}:{gid}"),
        Node::Regular {
            mode,
            uid,
            gid,
            size,
            links,
        } => format!("a file {mode:04o} {uid}:{gid} of {size} bytes with {links} link(s)"),
        Node::Symlink => "a symlink".into(),
        Node::Other(t) => format!("a {t}"),
    }
}
