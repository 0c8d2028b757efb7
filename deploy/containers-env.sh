# Sourced by deploy/image.sh and the image test: podman and buildah with
# storage and configuration of their own under $1, runc as the runtime
# (crun refuses these machines' cgroup layout), no ulimits to raise (these
# machines refuse it), cgroupfs (no systemd), events to a file.
state="$1"
mkdir -p "$state/storage" "$state/run"
cat > "$state/storage.conf" <<CONF
[storage]
driver = "vfs"
graphroot = "$state/storage"
runroot = "$state/run"
CONF
cat > "$state/containers.conf" <<CONF
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_STORAGE_CONF="$state/storage.conf"
export CONTAINERS_CONF="$state/containers.conf"
export BUILDAH_ISOLATION=chroot
