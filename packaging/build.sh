#!/usr/bin/env bash
# Builds fnlet's .deb and .rpm into target/packages/ from the metadata in agent/Cargo.toml:
#
#   packaging/build.sh [--release N]
#
# --release N: the package revision (deb fnlet_<version>-N, rpm fnlet-<version>-N; default 1).
# Bump it to make an upgrade of the same version.
#
# Steps: the release binary (stripped), man pages and shell completions generated from the
# binary's own clap definitions (`fnlet manpages`, `fnlet completions`) into
# target/release/packaging/, a check that the binary needs nothing the rpm's requirements do not
# list, then `cargo deb` and `cargo generate-rpm`. Installs what it lacks: Debian's binutils,
# dpkg-dev and rpm, and cargo-deb (`cargo install --locked`, a minute or two once per machine).
#
# The .rpm: with cargo-generate-rpm when it is installed; otherwise (installing it compiles for
# about five minutes) rpmbuild builds the same package from the same metadata
# (packaging/rpm/spec.py writes the spec). FNLET_RPM_BUILDER=cargo|rpmbuild forces one.
set -euo pipefail
cd "$(dirname "$0")/.."

release=1
while [ $# -gt 0 ]; do
  case "$1" in
    --release) release=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$release" in *[!0-9]*|'') echo "build.sh: --release takes a number" >&2; exit 2 ;; esac

# The asset paths in agent/Cargo.toml say target/release/: keep cargo's output there.
export CARGO_TARGET_DIR="$PWD/target"
out=target/packages
gen=target/release/packaging
t0=$(date +%s.%N)
step() { printf '==> %s\n' "$*" >&2; }
took() { printf '    %.1f s\n' "$(echo "$(date +%s.%N) - $1" | bc)" >&2; }

rpm_builder=${FNLET_RPM_BUILDER:-auto}
if [ "$rpm_builder" = auto ]; then
  command -v cargo-generate-rpm >/dev/null 2>&1 && rpm_builder=cargo || rpm_builder=rpmbuild
fi
case "$rpm_builder" in cargo|rpmbuild) ;; *) echo "build.sh: FNLET_RPM_BUILDER is cargo or rpmbuild" >&2; exit 2 ;; esac

need=()
for pkg in binutils dpkg-dev bc rpm python3; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  step "apt-get install ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
tools=(cargo-deb)
[ "$rpm_builder" = cargo ] && tools+=(cargo-generate-rpm)
for tool in "${tools[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    step "cargo install --locked $tool (once per machine)"
    t=$(date +%s.%N)
    cargo install --locked --quiet "$tool"
    took "$t"
  fi
done

step "cargo build --release -p fnlet"
t=$(date +%s.%N)
cargo build --release -p fnlet --quiet
strip --strip-unneeded target/release/fnlet
took "$t"

# The rpm lists its requirements by hand (auto-req = "no"): fail if the binary needs more.
step "checking the binary's library needs against the rpm's requirements"
allowed_libs="libseccomp.so.2 libgcc_s.so.1 libm.so.6 libc.so.6 ld-linux-x86-64.so.2"
for lib in $(objdump -p target/release/fnlet | awk '/NEEDED/ {print $2}'); do
  case " $allowed_libs " in
    *" $lib "*) ;;
    *) echo "build.sh: the binary needs $lib, which the rpm does not require: add it to [package.metadata.generate-rpm.requires]" >&2; exit 1 ;;
  esac
done
newest() { # newest symbol version of prefix $2 required from library $1
  objdump -p target/release/fnlet | awk -v lib="$1" '/required from/ {on = ($3 == lib":")} on && NF == 4 {print $4}' \
    | grep "^$2" | sort -V | tail -1
}
for pair in libc.so.6:GLIBC_2.34 libm.so.6:GLIBC_2.29 libgcc_s.so.1:GCC_4.2.0; do
  lib=${pair%%:*} listed=${pair#*:}
  got=$(newest "$lib" "${listed%%_*}_")
  if [ -n "$got" ] && [ "$(printf '%s\n%s\n' "$got" "$listed" | sort -V | tail -1)" != "$listed" ]; then
    echo "build.sh: the binary needs $lib($got), newer than the rpm's $lib($listed): update agent/Cargo.toml and the README's list of distributions" >&2
    exit 1
  fi
done

step "man pages and shell completions from the clap definitions"
rm -rf "$gen"
mkdir -p "$gen/man" "$gen/completions"
target/release/fnlet manpages "$gen/man"
gzip -9n "$gen"/man/*.1
target/release/fnlet completions bash >"$gen/completions/fnlet.bash"
target/release/fnlet completions zsh >"$gen/completions/_fnlet"
target/release/fnlet completions fish >"$gen/completions/fnlet.fish"

mkdir -p "$out"
step "cargo deb (revision $release)"
t=$(date +%s.%N)
cargo deb -p fnlet --no-build --deb-revision "$release" -o "$out/" >/dev/null
took "$t"
version=$(target/release/fnlet --version | awk '{print $2}')
t=$(date +%s.%N)
if [ "$rpm_builder" = cargo ]; then
  step "cargo generate-rpm (release $release)"
  cargo generate-rpm -p agent -s "release = \"$release\"" -o "$out/" >/dev/null
else
  step "rpmbuild (release $release), spec from agent/Cargo.toml's generate-rpm metadata"
  top=target/packages/rpmbuild
  rm -rf "$top"
  mkdir -p "$top/SPECS"
  python3 packaging/rpm/spec.py agent/Cargo.toml "$CARGO_TARGET_DIR" "$release" >"$top/SPECS/fnlet.spec"
  rpmbuild -bb --quiet --nodeps --target x86_64 \
    --define "_topdir $PWD/$top" --define "_rpmdir $PWD/$out" \
    --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
    "$top/SPECS/fnlet.spec" 2>&1 | grep -v -e 'should not be used directly' -e 'know what you are doing' >&2 || true
  rm -rf "$top"
fi
took "$t"
deb="$out/fnlet_${version}-${release}_amd64.deb"
rpm="$out/fnlet-${version}-${release}.x86_64.rpm"
for f in "$deb" "$rpm"; do
  [ -f "$f" ] || { echo "build.sh: $f was not built" >&2; exit 1; }
done
printf '==> built in %.0f s:\n' "$(echo "$(date +%s.%N) - $t0" | bc)" >&2
ls -l "$deb" "$rpm" >&2
