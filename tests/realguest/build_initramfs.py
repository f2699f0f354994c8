#!/usr/bin/env python3
"""Build the tiny Linux guest of the opt-in real-guest test of
``serve --qmp`` (``tests/test_qmp_real_guests.py``).

From Debian's own packages, fetched with ``apt-get download`` (no root
needed for that, nothing installed):

* ``linux-image-cloud-amd64`` -> the kernel it depends on: ``vmlinuz`` and
  the 8 modules a virtio NIC needs there (virtio_net and its dependencies,
  read from each module's ``depends=`` field, in load order);
* ``busybox-static`` -> every tool the guest uses.

and writes, into the output directory::

    vmlinuz           the kernel
    initramfs.gz      a gzip'd newc cpio archive, written here (no cpio tool needed)
    manifest.json     package versions, module load order, sha256 of both files

The guest's ``/init`` loads the modules, sets the address given on the
kernel command line (``colo_ip=A.B.C.D/NN``) on eth0, and starts three
services for the test's client:

* HTTP on port 80 (busybox httpd): ``/index.html`` (the same bytes on
  both replicas) and ``/cgi-bin/random`` (a UUID, the uptime and 16 bytes of
  /dev/urandom: different on each replica, so each answer diverges and
  makes ``serve --qmp`` ask for a checkpoint);
* TCP echo on port 7 (busybox nc);
* ICMP echo (the kernel's).

and prints ``colo-guest-ready`` on the console (ttyS0) when they are up.

Usage::

    python tests/realguest/build_initramfs.py [--out DIR] [--force]

DIR defaults to ``$COLO_COMPARE_GUEST_DIR`` or
``~/.cache/colo-compare/realguest``; an existing build is reused unless
``--force``.  Needs ``apt-get`` and ``dpkg-deb`` (Debian or Ubuntu) and
network access to the archive.  Exit status 0, or 2 with one line on
stderr.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile

#: the modules a virtio-net NIC needs with Debian's cloud kernel, by name;
#: their dependencies are found and loaded first
WANTED_MODULES = ("virtio_net", "virtio_pci")

INIT = r"""#!/bin/busybox sh
# colo-compare real-guest test: a tiny guest with three services.
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp /www/cgi-bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in @MODULES@; do insmod /lib/modules/$m.ko || echo "colo-guest: insmod $m failed"; done
addr=$(sed -n 's/.*colo_ip=\([^ ]*\).*/\1/p' /proc/cmdline)
ip link set lo up
n=0
while ! ip link show eth0 >/dev/null 2>&1; do
    n=$((n + 1)); [ $n -gt 100 ] && break; sleep 0.1
done
ip addr add "$addr" dev eth0
ip link set eth0 up
echo "the same page on both replicas" > /www/index.html
cat > /www/cgi-bin/random <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
cat /proc/sys/kernel/random/uuid
cat /proc/uptime
head -c 16 /dev/urandom | xxd -p
EOF
chmod 755 /www/cgi-bin/random
httpd -p 80 -h /www
nc -ll -p 7 -e cat &
echo colo-guest-ready
exec sh
"""


class BuildError(Exception):
    """One line for the user."""


def run(argv: list[str], cwd: str) -> str:
    try:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise BuildError(f"{argv[0]} not found (a Debian or Ubuntu host is needed)") from None
    except subprocess.TimeoutExpired:
        raise BuildError(f"{' '.join(argv)}: no result in 600 s") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["failed"])[-1]
        raise BuildError(f"{' '.join(argv)}: {last}")
    return r.stdout


def download(package: str, workdir: str) -> str:
    """``apt-get download`` one package; the path of its .deb."""
    before = set(os.listdir(workdir))
    run(["apt-get", "download", package], workdir)
    new = [f for f in set(os.listdir(workdir)) - before if f.endswith(".deb")]
    if len(new) != 1:
        raise BuildError(f"apt-get download {package}: expected one .deb, got {new}")
    return os.path.join(workdir, new[0])


def kernel_package(workdir: str) -> str:
    """The real kernel package the ``linux-image-cloud-amd64`` metapackage
    depends on."""
    out = run(["apt-cache", "depends", "linux-image-cloud-amd64"], workdir)
    names = re.findall(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out)
    if not names:
        raise BuildError("apt-cache depends linux-image-cloud-amd64: no kernel package named")
    return names[0]


def module_depends(path: str) -> list[str]:
    """The ``depends=`` of a module's .modinfo strings."""
    with open(path, "rb") as f:
        data = f.read()
    m = re.search(rb"\x00depends=([^\x00]*)\x00", data)
    if not m:
        return []
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d]


def module_order(module_root: str, wanted) -> list[tuple[str, str]]:
    """(name, path) of the wanted modules and their dependencies, each after
    what it depends on."""
    index = {}
    for d, _, files in os.walk(module_root):
        for f in files:
            if f.endswith(".ko"):
                index[f[:-3].replace("-", "_")] = os.path.join(d, f)
    order: list[str] = []

    def visit(name: str, chain: tuple) -> None:
        if name in order:
            return
        if name not in index:
            raise BuildError(f"module {name} (needed by {' <- '.join(chain) or 'the guest'}) "
                             "is not in the kernel package (built in, or compressed?)")
        for dep in module_depends(index[name]):
            visit(dep, chain + (name,))
        order.append(name)
    for name in wanted:
        visit(name, ())
    return [(n, index[n]) for n in order]


class Cpio:
    """A newc ("070701") cpio archive, as the kernel's initramfs reads it."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        name_b = name.encode() + b"\x00"
        head = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0))
        self.ino += 1
        self.buf.write(head.encode() + name_b)
        self.buf.write(b"\x00" * (-(110 + len(name_b)) % 4))
        self.buf.write(data)
        self.buf.write(b"\x00" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def device(self, name: str, major: int, minor: int) -> None:
        name_b = name.encode() + b"\x00"
        head = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, stat.S_IFCHR | 0o600, 0, 0, 1, 0, 0, 0, 0, major, minor, len(name_b), 0))
        self.ino += 1
        self.buf.write(head.encode() + name_b + b"\x00" * (-(110 + len(name_b)) % 4))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build(out: str, force: bool = False) -> dict:
    manifest_path = os.path.join(out, "manifest.json")
    if not force and os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if all(os.path.exists(os.path.join(out, n)) for n in ("vmlinuz", "initramfs.gz")):
            return manifest
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="colo-guest-") as work:
        kpkg = kernel_package(work)
        kdeb = download(kpkg, work)
        bdeb = download("busybox-static", work)
        kroot = os.path.join(work, "kernel")
        broot = os.path.join(work, "busybox")
        run(["dpkg-deb", "-x", kdeb, kroot], work)
        run(["dpkg-deb", "-x", bdeb, broot], work)
        vmlinuz = [f for f in os.listdir(os.path.join(kroot, "boot")) if f.startswith("vmlinuz-")]
        if len(vmlinuz) != 1:
            raise BuildError(f"{kpkg}: expected one vmlinuz, found {vmlinuz}")
        version = vmlinuz[0][len("vmlinuz-"):]
        modules = module_order(os.path.join(kroot, "lib", "modules", version), WANTED_MODULES)
        busybox = os.path.join(broot, "bin", "busybox")
        if not os.path.exists(busybox):
            raise BuildError("busybox-static: no /bin/busybox in the package")
        cpio = Cpio()
        for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules", "www", "www/cgi-bin"):
            cpio.directory(d)
        cpio.device("dev/console", 5, 1)
        with open(busybox, "rb") as f:
            cpio.file("bin/busybox", f.read(), 0o755)
        cpio.symlink("bin/sh", "busybox")
        for name, path in modules:
            with open(path, "rb") as f:
                cpio.file(f"lib/modules/{name}.ko", f.read())
        cpio.file("init", INIT.replace("@MODULES@", " ".join(n for n, _ in modules)).encode(),
                  0o755)
        tmp = os.path.join(out, "initramfs.gz.part")
        with open(tmp, "wb") as f:
            f.write(gzip.compress(cpio.finish(), 6))
        os.replace(tmp, os.path.join(out, "initramfs.gz"))
        shutil.copyfile(os.path.join(kroot, "boot", vmlinuz[0]), os.path.join(out, "vmlinuz"))
        manifest = {"kernel_package": kpkg, "kernel": version,
                    "busybox": os.path.basename(bdeb),
                    "modules": [n for n, _ in modules],
                    "sha256": {n: sha256(os.path.join(out, n)) for n in ("vmlinuz", "initramfs.gz")}}
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def default_dir() -> str:
    return os.environ.get("COLO_COMPARE_GUEST_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "colo-compare", "realguest")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=default_dir(), metavar="DIR")
    ap.add_argument("--force", action="store_true", help="build again even if DIR has a build")
    args = ap.parse_args()
    try:
        manifest = build(args.out, args.force)
    except BuildError as e:
        print(f"build_initramfs: {e}", file=sys.stderr)
        return 2
    print(f"build_initramfs: {args.out}: kernel {manifest['kernel']}, modules "
          f"{', '.join(manifest['modules'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
