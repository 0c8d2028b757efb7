#!/usr/bin/env bash
# Builds the Debian package: target/debian/turnpike_VERSION_ARCH.deb.
#   bash deploy/deb/build.sh            # cargo build --release, then package
#   bash deploy/deb/build.sh --no-build # package the binary already built
# It holds /usr/bin/turnpike, the systemd unit, /etc/turnpike/turnpike.toml
# (a conffile), the docs; the maintainer scripts beside this file make the
# turnpike system user and its state directory. Only dpkg-deb is needed.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "${1:-}" != "--no-build" ]; then
  cargo build --release --locked -p turnpike
fi
bin=target/release/turnpike
[ -x "$bin" ] || { echo "no $bin: build it first (cargo build --release)"; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
# The newest glibc symbol version the binary needs is the libc6 it depends on.
glibc=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)

root=target/debian/root
rm -rf "$root"
install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/turnpike" \
  "$root/usr/share/doc/turnpike"
# The debug info stays in target/ (75 MB of it); the package gets the code.
objcopy --strip-debug "$bin" "$root/usr/bin/turnpike"
chmod 755 "$root/usr/bin/turnpike"
install -m644 deploy/turnpike.service "$root/lib/systemd/system/turnpike.service"
install -m644 deploy/turnpike-watch.service "$root/lib/systemd/system/turnpike-watch.service"
install -m640 deploy/turnpike.toml "$root/etc/turnpike/turnpike.toml"
install -m644 README.md MIGRATING.md SECURITY.md ARCHITECTURE.md "$root/usr/share/doc/turnpike/"
cat > "$root/usr/share/doc/turnpike/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: turnpike

Files: *
License: MIT or Apache-2.0
COPYRIGHT
for script in postinst prerm postrm; do
  install -m755 "deploy/deb/$script" "$root/DEBIAN/$script"
done
echo /etc/turnpike/turnpike.toml > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: turnpike
Version: $version
Architecture: $arch
Maintainer: turnpike developers <turnpike@localhost>
Installed-Size: $size
Depends: libc6 (>= $glibc), libgcc-s1, passwd
Section: net
Priority: optional
Description: STUN/TURN server for WebRTC and VoIP
 turnpike serves STUN (RFC 8489) and TURN (RFC 8656, RFC 6062) over UDP,
 TCP and TLS, with long-term and TURN REST-API credentials, a peer policy
 that refuses internal ranges, per-host limits, Prometheus metrics and an
 admin API. The service is installed but not started: set a realm and
 users in /etc/turnpike/turnpike.toml, then systemctl enable --now turnpike.
CONTROL
out="target/debian/turnpike_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$out" >/dev/null
echo "$out"
