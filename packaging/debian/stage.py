#!/usr/bin/env python3
"""Lays out a debhelper tree from agent/Cargo.toml's [package.metadata.deb] table.

packaging/build.sh uses it when cargo-deb is not installed (installing that compiles for about
two minutes): Debian's own tools then make the same package from the same metadata.
dh_installsystemd writes the unit's maintainer-script snippets (the ones cargo-deb copies from
debhelper) into the scripts' #DEBHELPER# marker, dh_installdeb marks /etc as conffiles,
dh_shlibdeps finds `$auto`'s Depends from the binary, dh_gencontrol, dh_md5sums and dh_builddeb
do the rest. Only what fnlet's metadata uses is supported; anything else is refused.

    stage.py CARGO_TOML TARGET_DIR REVISION DIR

DIR gets debian/{control,changelog,fnlet.*} and debian/fnlet/ (the files, as installed).
"""

import glob
import os
import shutil
import sys
import tomllib

SUPPORTED_KEYS = {
    "maintainer", "copyright", "section", "priority", "extended-description", "depends",
    "recommends", "suggests", "maintainer-scripts", "assets", "systemd-units",
}
SUPPORTED_UNIT_KEYS = {
    "unit-scripts", "unit-name", "enable", "start", "restart-after-upgrade", "stop-on-upgrade",
}
MAINTAINER_SCRIPTS = ("preinst", "postinst", "prerm", "postrm")


def main() -> None:
    cargo_toml, target_dir, revision, out = sys.argv[1:5]
    crate_dir = os.path.dirname(os.path.abspath(cargo_toml))
    with open(cargo_toml, "rb") as f:
        manifest = tomllib.load(f)
    package = manifest["package"]
    meta = package["metadata"]["deb"]
    unknown = set(meta) - SUPPORTED_KEYS
    if unknown:
        sys.exit(f"stage.py: metadata keys not supported here: {sorted(unknown)}")
    units = meta.get("systemd-units", {})
    unknown = set(units) - SUPPORTED_UNIT_KEYS
    if unknown:
        sys.exit(f"stage.py: systemd-units keys not supported here: {sorted(unknown)}")
    if meta.get("depends", "$auto") != "$auto":
        sys.exit('stage.py: only depends = "$auto" is supported')

    def workspace(key: str) -> str:
        value = package[key]
        if isinstance(value, dict) and value.get("workspace"):
            with open(os.path.join(crate_dir, "..", "Cargo.toml"), "rb") as f:
                return tomllib.load(f)["workspace"]["package"][key]
        return value

    def source(path: str) -> str:
        # As cargo-deb does: target/release/ is the real target directory.
        if path.startswith("target/release/"):
            return os.path.join(target_dir, "release", path[len("target/release/"):])
        return os.path.normpath(os.path.join(crate_dir, path))

    name = package["name"]
    debian = os.path.join(out, "debian")
    tree = os.path.join(debian, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(tree)

    def install(src: str, dest: str, mode: int) -> None:
        path = os.path.join(tree, dest.lstrip("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(src, path)
        os.chmod(path, mode)

    for src, dest, mode in meta["assets"]:
        matches = sorted(glob.glob(source(src))) if "*" in src else [source(src)]
        if not matches:
            sys.exit(f"stage.py: {src} matches no file")
        for m in matches:
            install(m, os.path.join(dest, os.path.basename(m)) if dest.endswith("/") else dest,
                    int(mode, 8))
    # What cargo-deb adds: a machine-readable copyright file.
    copyright_file = os.path.join(tree, "usr/share/doc", name, "copyright")
    os.makedirs(os.path.dirname(copyright_file), exist_ok=True)
    with open(copyright_file, "w") as f:
        f.write(
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
            f"Upstream-Name: {name}\n"
            f"Copyright: {meta['copyright']}\n"
            f"License: {workspace('license')}\n"
        )
    os.chmod(copyright_file, 0o644)

    # The unit: where bookworm's dh_installsystemd looks for it (lib/systemd/system); build.sh
    # moves it to usr/lib/systemd/system afterwards, where cargo-deb puts it.
    if units:
        unit = units.get("unit-name", name)
        install(os.path.join(source(units["unit-scripts"]), f"{unit}.service"),
                f"lib/systemd/system/{unit}.service", 0o644)
    scripts = source(meta["maintainer-scripts"]) if "maintainer-scripts" in meta else None
    for script in MAINTAINER_SCRIPTS:
        path = os.path.join(scripts, script) if scripts else ""
        if path and os.path.exists(path):
            shutil.copyfile(path, os.path.join(debian, f"{name}.{script}"))

    description = package.get("description", "")
    extended = meta.get("extended-description", "").strip()
    with open(os.path.join(debian, "control"), "w") as f:
        f.write(
            f"Source: {name}\n"
            f"Section: {meta.get('section', 'misc')}\n"
            f"Priority: {meta.get('priority', 'optional')}\n"
            f"Maintainer: {meta['maintainer']}\n"
            "Build-Depends: debhelper-compat (= 13)\n"
            "Rules-Requires-Root: no\n"
            "\n"
            f"Package: {name}\n"
            "Architecture: amd64\n"
            "Depends: ${shlibs:Depends}\n"
        )
        if "recommends" in meta:
            f.write(f"Recommends: {meta['recommends']}\n")
        if "suggests" in meta:
            f.write(f"Suggests: {meta['suggests']}\n")
        f.write(f"Description: {description}\n")
        for line in wrap(extended):
            f.write(f" {line}\n")
    with open(os.path.join(debian, "changelog"), "w") as f:
        f.write(
            f"{name} ({workspace('version')}-{revision}) unstable; urgency=medium\n\n"
            "  * Built from agent/Cargo.toml by packaging/build.sh.\n\n"
            f" -- {meta['maintainer']}  Thu, 01 Jan 1970 00:00:00 +0000\n"
        )
    # dh_installsystemd's options, from the metadata (cargo-deb's defaults where it is silent).
    # debhelper (compat 13) restarts after an upgrade by default, which implies not stopping
    # before it; its --no-stop-on-upgrade means neither stop nor restart.
    flags = []
    if not units.get("enable", True):
        flags.append("--no-enable")
    if not units.get("start", True):
        flags.append("--no-start")
    if not units.get("restart-after-upgrade", True):
        if units.get("stop-on-upgrade", True):
            flags.append("--no-restart-after-upgrade")
        else:
            flags.append("--no-stop-on-upgrade")
    with open(os.path.join(out, "installsystemd.flags"), "w") as f:
        f.write(" ".join(flags) + "\n")


def wrap(text: str, width: int = 79) -> list[str]:
    """The extended description as control-file lines (cargo-deb wraps at 79 too)."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return lines


if __name__ == "__main__":
    main()
