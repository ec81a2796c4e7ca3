#!/usr/bin/env bash
# Makes the Debian 12 base image that `make image` builds the Dockerfile FROM,
# for machines that reach Debian's apt mirror but no image registry:
#
#   1. debootstrap --variant=minbase bookworm into a folder, from the mirror
#      apt's own sources name (or MIRROR=...);
#   2. slimmed as Docker's debian:bookworm-slim is (no documentation, manual
#      pages or translations, now or from later apt installs; no apt lists);
#   3. packed as build/image/debian-bookworm.tar (kept: a later run, or a
#      fresh buildah store, starts from it instead of debootstrapping again);
#   4. copied into an empty container (`buildah from scratch`) and committed
#      as localhost/debian:bookworm (or BASE_IMAGE=...).
#
# Needs root (debootstrap chroots) and buildah, debootstrap (deploy/deps.sh image).
# Nothing is done when the image already exists; REBUILD=1 makes it again.
set -eu
cd "$(dirname "$0")/.."
NAME=${BASE_IMAGE:-localhost/debian:bookworm}
CACHE=${IMAGE_CACHE:-build/image}
SUITE=bookworm
tar=$CACHE/debian-$SUITE.tar

if [ -z "${REBUILD:-}" ] && buildah inspect --type image "$NAME" >/dev/null 2>&1; then
  echo "base_image.sh: $NAME exists"
  exit 0
fi

mirror() { # the first Debian URI of apt's sources (deb822 or one-line form)
  local m
  m=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null |
      tr ' ' '\n' | grep -E '/debian/?$' | head -1)
  [ -n "$m" ] || m=$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' \
      /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null)
  echo "${m:-http://deb.debian.org/debian}"
}

if [ -n "${REBUILD:-}" ] || [ ! -s "$tar" ]; then
  MIRROR=${MIRROR:-$(mirror)}
  root=$CACHE/rootfs
  mkdir -p "$CACHE"
  rm -rf "$root"
  echo "base_image.sh: debootstrap $SUITE from $MIRROR"
  t0=$(date +%s)
  debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
    { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  # as debian:bookworm-slim: later installs leave out documentation too
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
EOF
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
EOF
  find "$root/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
         "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/*.log \
         "$root"/var/cache/ldconfig/aux-cache
  # no leftover from the host: the image names no host and resolves nothing itself
  : >"$root/etc/hostname"
  rm -f "$root/etc/resolv.conf"
  tar --numeric-owner -C "$root" -cf "$tar.tmp" .
  mv "$tar.tmp" "$tar"
  rm -rf "$root"
  echo "base_image.sh: $tar ($(du -m "$tar" | cut -f1) MiB) in $(($(date +%s) - t0)) s"
fi

ctr=$(buildah from scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah add "$ctr" "$tar" / >/dev/null
buildah config --cmd '["/bin/bash"]' --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --label "org.opencontainers.image.description=Debian $SUITE minbase from debootstrap (deploy/base_image.sh)" \
  "$ctr"
buildah commit --quiet --rm "$ctr" "$NAME" >/dev/null
trap - EXIT
echo "base_image.sh: committed $NAME"
