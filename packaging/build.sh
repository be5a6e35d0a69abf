#!/usr/bin/env bash
# Builds fnlet's .deb and .rpm into target/packages/ from the metadata in agent/Cargo.toml:
#
#   packaging/build.sh [--release N]...
#
# --release N: the package revision (deb fnlet_<version>-N, rpm fnlet-<version>-N; default 1).
# Bump it to make an upgrade of the same version. Given more than once, every revision is
# packaged from the same binary (the packaging test's upgrade: --release 1 --release 2).
#
# Steps: the release binary (stripped), man pages and shell completions generated from the
# binary's own clap definitions (`fnlet manpages`, `fnlet completions`) into
# target/release/packaging/, a check that the binary needs nothing the rpm's requirements do not
# list, then the .debs and the .rpms, side by side. Installs what it lacks from Debian's packages
# (binutils, dpkg-dev, xz-utils, rpm, debhelper).
#
# The .deb: with cargo-deb when it is installed; otherwise (installing it compiles for about two
# minutes, most of a fresh machine's packaging time) Debian's debhelper makes the same package
# from the same metadata: packaging/debian/stage.py lays out the files and the control data,
# dh_installsystemd writes the unit's maintainer-script snippets (the ones cargo-deb copies from
# debhelper), dh_shlibdeps the Depends. FNLET_DEB_BUILDER=cargo|debhelper forces one (cargo
# installs cargo-deb if missing, compiled beside the release build).
# The .rpm: with cargo-generate-rpm when it is installed; otherwise (installing it compiles for
# about five minutes) rpmbuild builds the same package from the same metadata
# (packaging/rpm/spec.py writes the spec). FNLET_RPM_BUILDER=cargo|rpmbuild forces one.
set -euo pipefail
cd "$(dirname "$0")/.."

releases=()
while [ $# -gt 0 ]; do
  case "$1" in
    --release)
      case "${2:-}" in *[!0-9]*|'') echo "build.sh: --release takes a number" >&2; exit 2 ;; esac
      releases+=("$2")
      shift 2
      ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#releases[@]} -gt 0 ] || releases=(1)

# The asset paths in agent/Cargo.toml say target/release/: keep cargo's output there.
export CARGO_TARGET_DIR="$PWD/target"
out=target/packages
gen=target/release/packaging
t0=$(date +%s.%N)
step() { printf '==> %s\n' "$*" >&2; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }
took() { printf '    %s s\n' "$(since "$1")" >&2; }

rpm_builder=${FNLET_RPM_BUILDER:-auto}
if [ "$rpm_builder" = auto ]; then
  command -v cargo-generate-rpm >/dev/null 2>&1 && rpm_builder=cargo || rpm_builder=rpmbuild
fi
case "$rpm_builder" in cargo|rpmbuild) ;; *) echo "build.sh: FNLET_RPM_BUILDER is cargo or rpmbuild" >&2; exit 2 ;; esac
deb_builder=${FNLET_DEB_BUILDER:-auto}
if [ "$deb_builder" = auto ]; then
  command -v cargo-deb >/dev/null 2>&1 && deb_builder=cargo || deb_builder=debhelper
fi
case "$deb_builder" in cargo|debhelper) ;; *) echo "build.sh: FNLET_DEB_BUILDER is cargo or debhelper" >&2; exit 2 ;; esac

need=()
apt_pkgs="binutils dpkg-dev xz-utils rpm python3"
[ "$deb_builder" = cargo ] || apt_pkgs="$apt_pkgs debhelper"
for pkg in $apt_pkgs; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
tools=()
if [ "$deb_builder" = cargo ] && ! command -v cargo-deb >/dev/null 2>&1; then
  tools+=(cargo-deb)
fi
if [ "$rpm_builder" = cargo ] && ! command -v cargo-generate-rpm >/dev/null 2>&1; then
  tools+=(cargo-generate-rpm)
fi
logs=$(mktemp -d)
tools_job='' deb_job=''
kill_tree() { # a job of ours and everything it started, children first
  local child
  for child in $(pgrep -P "$1" || true); do kill_tree "$child"; done
  kill "$1" 2>/dev/null || true
}
cleanup() {
  # A tool install or a .deb still being made when a step failed (or on Ctrl-C, which a script's
  # background jobs ignore): stop it.
  local job
  for job in $tools_job $deb_job; do
    kill_tree "$job"
    wait "$job" 2>/dev/null || true
  done
  rm -rf "$logs"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The tools compile beside the release build, which leaves a core idle for much of its end (one
# big crate, then the link). cargo-deb as a debug build takes about half the CPU time of its
# release profile, and without its default features (liblzma compiled from C, ELF build ids) it
# pipes the payload to Debian's xz at the same level instead: the same .deb (same files, same
# control data), made no slower, since xz does that work either way.
install_tools() {
  local tool
  if [ ${#need[@]} -gt 0 ]; then
    # With the package lists as they are, else fresh ones (a machine that never ran apt-get update).
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" ||
      { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"; } ||
      return 1
  fi
  for tool in "${tools[@]}"; do
    case "$tool" in
      cargo-deb) cargo install --locked --quiet --debug --no-default-features cargo-deb || return 1 ;;
      *) cargo install --locked --quiet "$tool" || return 1 ;;
    esac
  done
}
# What is missing is installed beside the release build (it is needed only after it).
installing="${need[*]:+apt-get install ${need[*]}}${need[*]:+${tools[*]:+; }}${tools[*]:+cargo install ${tools[*]}}"
if [ -n "$installing" ]; then
  step "$installing (once per machine), beside the build"
  t_tools=$(date +%s.%N)
  (
    if install_tools >&2; then echo 0; else echo 1; fi >"$logs/tools.rc"
    date +%s.%N >"$logs/tools.end"
  ) >"$logs/tools.log" 2>&1 &
  tools_job=$!
fi

step "cargo build --release -p fnlet"
t=$(date +%s.%N)
cargo build --release -p fnlet --quiet
took "$t"

if [ -n "$tools_job" ]; then
  t=$(date +%s.%N)
  wait "$tools_job" || true
  tools_job=''
  if [ "$(cat "$logs/tools.rc" 2>/dev/null)" != 0 ]; then
    cat "$logs/tools.log" >&2
    echo "build.sh: $installing failed" >&2
    exit 1
  fi
  printf '    %s: %s s, of which waited for after the build: %s s\n' "$installing" \
    "$(awk -v a="$t_tools" -v b="$(cat "$logs/tools.end")" 'BEGIN {printf "%.1f", b - a}')" "$(since "$t")" >&2
fi
strip --strip-unneeded target/release/fnlet

# The rpm lists its requirements by hand (auto-req = "no"): fail if the binary needs more.
step "checking the binary's library needs against the rpm's requirements"
allowed_libs="libgcc_s.so.1 libm.so.6 libc.so.6 ld-linux-x86-64.so.2"
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


version=$(target/release/fnlet --version | awk '{print $2}')
mkdir -p "$out"
# Making a package is mostly one compressor on one core (xz for the .deb, zstd for the .rpm):
# the .debs and the .rpms are made side by side.
build_debs() {
  local release stage dest="$PWD/$out"
  for release in "${releases[@]}"; do
    if [ "$deb_builder" = cargo ]; then
      cargo deb -p fnlet --no-build --deb-revision "$release" -o "$out/" >/dev/null || return 1
      continue
    fi
    stage=$PWD/target/packages/debhelper-$release
    python3 packaging/debian/stage.py agent/Cargo.toml "$CARGO_TARGET_DIR" "$release" "$stage" || return 1
    # One && chain: errexit does not apply inside a function called from an `if`.
    # shellcheck disable=SC2046 # the flags are words
    (
      cd "$stage" &&
        unset DH_VERBOSE &&
        dh_installsystemd -pfnlet $(cat installsystemd.flags) &&
        # Bookworm's dh_installsystemd reads units from lib/systemd/system only; the package
        # ships it where cargo-deb (and merged /usr) put it.
        mkdir -p debian/fnlet/usr/lib/systemd &&
        mv debian/fnlet/lib/systemd/system debian/fnlet/usr/lib/systemd/ &&
        rmdir debian/fnlet/lib/systemd debian/fnlet/lib &&
        dh_installdeb -pfnlet &&
        dh_shlibdeps -pfnlet &&
        dh_gencontrol -pfnlet &&
        dh_md5sums -pfnlet &&
        dh_builddeb -pfnlet --destdir="$dest" >/dev/null
    ) || return 1
    rm -rf "$stage"
  done
}
build_rpms() {
  local release top
  for release in "${releases[@]}"; do
    if [ "$rpm_builder" = cargo ]; then
      cargo generate-rpm -p agent -s "release = \"$release\"" -o "$out/" >/dev/null || return 1
    else
      top=target/packages/rpmbuild-$release
      rm -rf "$top"
      mkdir -p "$top/SPECS"
      python3 packaging/rpm/spec.py agent/Cargo.toml "$CARGO_TARGET_DIR" "$release" >"$top/SPECS/fnlet.spec" || return 1
      rpmbuild -bb --quiet --nodeps --target x86_64 \
        --define "_topdir $PWD/$top" --define "_rpmdir $PWD/$out" \
        --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
        "$top/SPECS/fnlet.spec" 2>&1 | grep -v -e 'should not be used directly' -e 'know what you are doing' \
        -e '^Building target platforms' -e '^Building for target' || true
      rm -rf "$top"
    fi
  done
}
if [ "$deb_builder" = cargo ]; then deb_how="cargo deb"; else deb_how="debhelper from agent/Cargo.toml's deb metadata"; fi
if [ "$rpm_builder" = cargo ]; then rpm_how="cargo generate-rpm"; else rpm_how="rpmbuild from its generate-rpm metadata"; fi
step "$deb_how, and $rpm_how (revision ${releases[*]})"
t=$(date +%s.%N)
build_debs >"$logs/deb.log" 2>&1 &
deb_job=$!
if ! build_rpms >"$logs/rpm.log" 2>&1; then
  cat "$logs/rpm.log" >&2
  echo "build.sh: building the .rpm failed" >&2
  exit 1
fi
if ! wait "$deb_job"; then
  deb_job=''
  cat "$logs/deb.log" >&2
  echo "build.sh: building the .deb failed" >&2
  exit 1
fi
deb_job=''
cat "$logs/deb.log" "$logs/rpm.log" >&2 # their warnings, if any
took "$t"
built=()
for release in "${releases[@]}"; do
  built+=("$out/fnlet_${version}-${release}_amd64.deb" "$out/fnlet-${version}-${release}.x86_64.rpm")
done
for f in "${built[@]}"; do
  [ -f "$f" ] || { echo "build.sh: $f was not built" >&2; exit 1; }
done
printf '==> built in %s s:\n' "$(since "$t0")" >&2
ls -l "${built[@]}" >&2
