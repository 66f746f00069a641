# The same image as Containerfile, built by Nix: nixroll plus nsenter (the agent enters PID 1's
# namespaces with it), nothing else. Non-root by default; the agent DaemonSet runs it as root.
{
  dockerTools,
  nixroll,
  util-linuxMinimal,
  cacert,
}:
dockerTools.buildLayeredImage {
  name = "ghcr.io/nixroll/nixroll";
  tag = nixroll.version;
  contents = [
    nixroll
    util-linuxMinimal
    cacert
  ];
  config = {
    Entrypoint = [ "/bin/nixroll" ];
    User = "65532:65532";
    Env = [
      "PATH=/bin"
      "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"
    ];
    Labels = {
      "org.opencontainers.image.title" = "nixroll";
      "org.opencontainers.image.description" = nixroll.meta.description;
      "org.opencontainers.image.version" = nixroll.version;
      "org.opencontainers.image.source" = "https://github.com/nixroll/nixroll";
      "org.opencontainers.image.licenses" = "Apache-2.0";
    };
  };
}
