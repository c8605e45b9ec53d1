"""Signed kernel images: made by the real ``kerf sign`` (kerf-multikernel 0.4.0), checked at
``kexec load`` against the keyring a machine was started with.

A signed image loads and runs; under ``require_signed`` (the real KEXEC_SIG_FORCE) an unsigned,
tampered or foreign-signed image is refused with the real kernel's errno (EKEYREJECTED, and
ENOKEY for a signer the keyring does not hold), the instance left as it was; without the
requirement an unsigned image loads as before and a signature that fails is logged, as
``kimage_validate_signature`` does. What was checked is what runs, also after the file changes.
"""

import datetime
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from helpers import wait_until
from partition.errors import InvalidSpec, KeyRejected, KeyUnavailable
from partition.host import signing
from partition.host.kimage import pack_elf, unpack_elf

CPUS = sorted(os.sched_getaffinity(0))
MKCTL = [sys.executable, "-m", "partition.control.cli"]
KERF = shutil.which("kerf")
# each test signs with kerf or packs with mkctl (subprocesses), most then boot a machine
pytestmark = [pytest.mark.system,
              pytest.mark.skipif(KERF is None, reason="kerf-multikernel is a test dependency")]

KERNEL = '''
from partition import Kernel


class Marked(Kernel):
    def boot(self) -> None:
        self.printk("marked kernel {mark} up")
'''


def _key_pair(tmp_path, name, key):
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mk signing {name}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    key_path, cert_path = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture
def keys(tmp_path):
    """Two signers: an RSA key the machine trusts, an ECDSA one it does not."""
    return {"trusted": _key_pair(tmp_path, "trusted", rsa.generate_private_key(65537, 2048)),
            "foreign": _key_pair(tmp_path, "foreign", ec.generate_private_key(ec.SECP256R1()))}


def kerf_sign(image, out, key, cert):
    r = subprocess.run([KERF, "sign", str(image), "-o", str(out), "--key", str(key),
                        "--cert", str(cert)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def images(tmp_path, keys):
    """The marked kernel as a .py file, packed (mkctl pack), signed by each key (kerf sign),
    and a signed one with a byte of its code changed after signing."""
    src = tmp_path / "marked.py"
    src.write_text(KERNEL.format(mark="A"))
    r = subprocess.run(MKCTL + ["pack", str(src), "-o", str(tmp_path / "marked.elf")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = {"py": src, "elf": tmp_path / "marked.elf"}
    for who, (key, cert) in keys.items():
        out[who] = kerf_sign(out["elf"], tmp_path / f"marked.{who}", key, cert)
    data = bytearray(out["trusted"].read_bytes())
    at = data.index(b"marked kernel A")
    data[at + len("marked kernel ")] = ord("B")
    out["tampered"] = tmp_path / "marked.tampered"
    out["tampered"].write_bytes(bytes(data))
    return out


def _machine(factory, keys, required=True, keyring="trusted"):
    return factory(cpus=CPUS, memory="64M", host_cpus=[CPUS[0]], oversubscribe=True,
                   keyring=str(keys[keyring][1]) if keyring else None, require_signed=required)


def _events(m, name):
    with open(os.path.join(m.run_dir, "events.log")) as f:
        return [e for e in map(json.loads, f) if e["event"] == name]


# -- the format ----------------------------------------------------------------------------------
def test_kerf_signs_a_packed_kernel_and_the_host_reads_it_back(images, keys):
    data = images["trusted"].read_bytes()
    assert data.endswith(signing.MODULE_SIG_STRING)
    parts = signing.split(data)
    assert parts is not None and parts[0] == images["elf"].read_bytes()
    assert unpack_elf(parts[0]) == images["py"].read_bytes()
    signer = signing.Keyring(str(keys["trusted"][1])).verify(*parts)
    assert signer == "CN=mk signing trusted"


@pytest.mark.parametrize("change, words", [
    (lambda d: d[:-1] + b"?", None),                                        # no marker: unsigned
    (lambda d: d[:-40] + bytes(12) + d[-28:], "non-zero fields|length|not PKCS"),
    (lambda d: d[:-33] + b"\x01" + d[-32:], "exceeds the image|non-zero"),
])
def test_a_trailer_that_does_not_parse_is_rejected(images, change, words):
    data = change(images["trusted"].read_bytes())
    if words is None:
        assert signing.split(data) is None
        return
    with pytest.raises(KeyRejected, match=words) as e:
        signing.split(data)
    assert e.value.errno == errno.EKEYREJECTED


def test_an_elf_file_without_an_emulated_kernel_is_no_image(tmp_path):
    from partition.errors import BadKernelImage
    for data in (b"\x7fELF" + bytes(60), pack_elf(b"x = 1")[:80]):
        with pytest.raises(BadKernelImage) as e:
            unpack_elf(data)
        assert e.value.errno == errno.ENOEXEC


# -- at load, on a machine -----------------------------------------------------------------------
def test_a_signed_image_loads_and_runs_where_signatures_are_required(machine_factory, keys,
                                                                     images):
    m = _machine(machine_factory, keys)
    m.create("web", "8M", cpus=[CPUS[-1]])
    d = m.load("web", str(images["trusted"]))
    assert d["signature"] == "verified: CN=mk signing trusted"
    m.start("web")
    assert "marked kernel A up" in m.console("web")
    assert _events(m, "kimage_signature_verified")
    assert m.show()["machine"]["signatures"]["required"] is True


@pytest.mark.parametrize("which, cls, code, words", [
    ("py", KeyRejected, errno.EKEYREJECTED, "is not signed and this machine requires"),
    ("elf", KeyRejected, errno.EKEYREJECTED, "is not signed and this machine requires"),
    ("tampered", KeyRejected, errno.EKEYREJECTED, "does not match the image"),
    ("foreign", KeyUnavailable, errno.ENOKEY, "keyring does not hold"),
])
def test_what_does_not_verify_is_refused_and_changes_nothing(machine_factory, keys, images,
                                                              which, cls, code, words):
    m = _machine(machine_factory, keys)
    m.create("web", "8M", cpus=[CPUS[-1]])
    before = m.show("web")
    with pytest.raises(cls, match=words) as e:
        m.load("web", str(images[which]))
    assert e.value.errno == code
    after = m.show("web")
    assert after["state"] == "ready" and after["pid"] is None
    assert {k: after[k] for k in ("state", "kernel", "kernel_spec", "boots")} == \
        {k: before[k] for k in ("state", "kernel", "kernel_spec", "boots")}
    assert _events(m, "kimage_rejected")[-1]["code"] == errno.errorcode[code]


def test_a_module_spec_is_refused_where_signatures_are_required(machine_factory, keys):
    m = _machine(machine_factory, keys)
    m.create("web", "8M", cpus=[CPUS[-1]])
    with pytest.raises(KeyRejected, match="carries no signature"):
        m.load("web", "kernels.idle:IdleKernel")


def test_without_the_requirement_unsigned_loads_and_a_failed_signature_is_logged(
        machine_factory, keys, images):
    m = _machine(machine_factory, keys, required=False)
    m.create("web", "8M", cpus=[CPUS[-1]])
    for which in ("py", "elf"):
        assert m.load("web", str(images[which]))["signature"] == ""
        m.unload("web")
    d = m.load("web", str(images["foreign"]))             # kimage_validate_signature: logged
    assert d["signature"].startswith("unverified:") and "ENOKEY" in d["signature"]
    m.start("web")
    assert "marked kernel A up" in m.console("web")
    assert _events(m, "kimage_signature_unverified")
    m.kill("web", force=True)
    m.unload("web")
    # and a machine with no keyring at all loads every kind
    bare = _machine(machine_factory, keys, required=False, keyring=None)
    bare.create("web", "8M", cpus=[CPUS[-1]])
    assert bare.load("web", str(images["trusted"]))["signature"].startswith("unverified")


def test_show_says_of_the_signature_what_cli_md_says(machine_factory, keys):
    """docs/cli.md's JSON of show: ``signature`` is null while nothing is loaded, "" for an
    unsigned image (the page said "" for both)."""
    m = _machine(machine_factory, keys, required=False)
    m.create("web", "8M", cpus=[CPUS[-1]])
    assert m.show("web")["signature"] is None
    m.load("web", "kernels.idle:IdleKernel")
    assert m.show("web")["signature"] == ""
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "cli.md")) as f:
        said = " ".join(f.read().split())
    assert 'signature (null when nothing is loaded, "" unsigned,' in said


def test_what_was_checked_is_what_runs_after_the_file_changes(machine_factory, keys, images,
                                                               tmp_path):
    """The file is read once, at load: a restart after it was replaced boots the checked one."""
    image = tmp_path / "live.signed"
    shutil.copy(images["trusted"], image)
    m = _machine(machine_factory, keys)
    m.create("web", "8M", cpus=[CPUS[-1]], recovery="restart", max_restarts=3,
             restart_window=30)
    m.load("web", str(image))
    m.start("web")
    image.write_text(KERNEL.format(mark="EVIL"))          # unsigned now; never checked
    m.fault("web", "kill")
    wait_until(m, lambda: m.show("web")["counters"]["restarts"] == 1
               and m.show("web")["state"] == "active")
    console = m.console("web")
    assert m.show("web")["boots"] == 2
    assert "marked kernel A up" in console and "EVIL" not in console


def test_a_machine_refuses_a_requirement_nothing_could_meet(machine_factory, tmp_path):
    with pytest.raises(InvalidSpec, match="no keyring"):
        machine_factory(cpus=CPUS, memory="64M", host_cpus=[CPUS[0]], oversubscribe=True,
                        require_signed=True)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(InvalidSpec, match="holds no X.509 certificate"):
        machine_factory(cpus=CPUS, memory="64M", host_cpus=[CPUS[0]], oversubscribe=True,
                        keyring=str(junk))


# -- through mkctl and the real kerf ---------------------------------------------------------------
def test_mkctl_init_refuses_require_signed_without_a_keyring(run_dir):
    r = subprocess.run(MKCTL + ["init", "--run-dir", run_dir, "--require-signed"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "--require-signed needs --keyring" in r.stderr
    assert not os.path.exists(run_dir)


def _bridge_works() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/fuse")


@pytest.mark.skipif(not _bridge_works(), reason="the kerf bridge needs root and /dev/fuse")
def test_kerf_loads_what_kerf_signed_and_gets_the_kernels_errno_for_the_rest(run_dir, keys,
                                                                             images):
    from partition import linux
    apic = linux.physical_cpu_ids()[CPUS[-1]]

    def kerf(*args):
        return subprocess.run(MKCTL + ["kerf", "--run-dir", run_dir, "--keyring",
                                       str(keys["trusted"][1]), "--require-signed", "--", *args],
                              capture_output=True, text=True, timeout=120)
    assert kerf("init", f"--cpus={apic}", "--memory=64MB").returncode == 0
    assert kerf("create", "web", f"--cpus={apic}", "--memory=16MB").returncode == 0
    for which, said in (("py", "Key was rejected by service"),
                        ("tampered", "Key was rejected by service"),
                        ("foreign", "Required key not available")):
        r = kerf("load", "web", f"--kernel={images[which]}")
        assert r.returncode == 1 and said in r.stdout + r.stderr, (which, r.stdout, r.stderr)
    r = kerf("load", "web", f"--kernel={images['trusted']}")
    assert r.returncode == 0 and "Kernel loaded successfully" in r.stdout, r.stderr
    assert kerf("start", "web").returncode == 0
    shown = json.loads(subprocess.run(MKCTL + ["show", "web", "--run-dir", run_dir, "--format",
                                               "json"], capture_output=True, text=True,
                                      timeout=60).stdout)
    assert shown["state"] == "active"
    assert shown["signature"] == "verified: CN=mk signing trusted"
    assert kerf("kill", "--force", "web").returncode == 0


def test_an_adopted_instance_keeps_its_checked_image_and_its_llc_ways(run_dir, machine_factory,
                                                                      keys, images, tmp_path):
    """A new host takes the dead one's policy (keyring, requirement, LLC ways) from its state
    file, and each instance's checked image and mask from its record: a restart under the new
    host runs the image checked at load, and the instance keeps its resctrl group."""
    root = tmp_path / "resctrl"
    (root / "info" / "L3").mkdir(parents=True)
    (root / "schemata").write_text("L3:0=ff\n")
    image = tmp_path / "live.signed"
    shutil.copy(images["trusted"], image)
    old = machine_factory(cpus=CPUS, memory="64M", host_cpus=[CPUS[0]], oversubscribe=True,
                          run_dir=run_dir, survive_host=True, keyring=str(keys["trusted"][1]),
                          require_signed=True, llc_way_mask=0xFF, resctrl_root=str(root))
    old.create("web", "8M", cpus=[CPUS[-1]], recovery="restart", max_restarts=3,
               restart_window=30, llc_way_mask=0x0F)
    old.load("web", str(image))
    old.start("web")
    group = old.resctrl.group(old.show("web")["id"])
    cfg = old.abandon()
    assert cfg["require_signed"] is True and cfg["llc_way_mask"] == 0xFF
    image.write_text(KERNEL.format(mark="EVIL"))
    from partition.host import rundir
    run = rundir.claim(run_dir)
    run.owned = True                     # removed when the new host closes, as a scenario's
    new = machine_factory(run_dir=run, adopt=True, **cfg)
    web = new.show("web")
    assert web["llc_way_mask"] == "0xf" and new.resctrl.group(web["id"]) == group
    assert web["signature"] == "verified: CN=mk signing trusted"
    new.fault("web", "kill")
    wait_until(new, lambda: new.show("web")["counters"]["restarts"] == 1
               and new.show("web")["state"] == "active")
    assert "marked kernel A up" in new.console("web") and "EVIL" not in new.console("web")
    with open(os.path.join(group, "tasks")) as f:
        assert str(new.show("web")["pid"]) in f.read().split()
    with pytest.raises(KeyRejected):                        # the policy came along
        new.create("db", "8M", cpus=[CPUS[-1]])
        new.load("db", str(image))


def test_a_new_host_checks_the_recorded_image_again(run_dir, machine_factory, keys, images):
    """The state file carries the image a restart runs. A new host under KEXEC_SIG_FORCE does
    not take it on the dead host's word: it verifies it again, and an image changed in the
    record (a byte of its code) is never run; the instance runs on, with nothing to restart."""
    import base64

    from partition.host import adoption, rundir
    old = machine_factory(cpus=CPUS, memory="64M", host_cpus=[CPUS[0]], oversubscribe=True,
                          run_dir=run_dir, survive_host=True, keyring=str(keys["trusted"][1]),
                          require_signed=True)
    old.create("web", "8M", cpus=[CPUS[-1]])
    old.load("web", str(images["trusted"]))
    old.start("web")
    pid = old.show("web")["pid"]
    cfg = old.abandon()
    state = adoption.read_state(run_dir)
    k = state["instances"][0]["kimage"]
    tampered = images["tampered"].read_bytes()
    if "image" in k:          # the checked source, as a host wrote it before this check
        k["image"] = base64.b64encode(unpack_elf(signing.split(tampered)[0])).decode()
    else:                     # the file as read, signature and all
        k["file"] = base64.b64encode(tampered).decode()
    adoption.write_state(run_dir, state)
    run = rundir.claim(run_dir)
    run.owned = True                     # removed when the new host closes
    new = machine_factory(run_dir=run, adopt=True, **cfg)
    web = new.show("web")
    assert web["state"] == "active" and web["pid"] == pid
    assert web["signature"] is None, f"a changed image was taken: {web['signature']}"
    rejected = _events(new, "kimage_rejected")
    assert rejected and rejected[-1]["code"] == "EKEYREJECTED", rejected


def test_a_live_update_to_an_image_that_does_not_verify_leaves_the_kernel_running(
        machine_factory, keys, images):
    m = _machine(machine_factory, keys)
    m.create("web", "8M", cpus=[CPUS[-1]])
    m.load("web", str(images["trusted"]))
    m.start("web")
    pid = m.show("web")["pid"]
    with pytest.raises(KeyRejected):
        m.live_update("web", str(images["tampered"]))
    d = m.show("web")
    assert d["state"] == "active" and d["pid"] == pid and d["boots"] == 1
    assert d["signature"] == "verified: CN=mk signing trusted"


def test_mkctl_pack_refuses_what_is_not_python(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def (:\n")
    r = subprocess.run(MKCTL + ["pack", str(bad), "-o", str(tmp_path / "x.elf")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "is not Python source" in r.stderr
    assert not (tmp_path / "x.elf").exists()
