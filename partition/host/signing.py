"""Signed kernel images: the appended-signature format ``kerf sign`` (and the kernel's
``scripts/sign-file``) writes, checked the way ``kexec_file_load`` checks it.

A signed image is ``content || PKCS#7 || struct module_signature || "~Module signature
appended~\\n"``. The PKCS#7 SignedData is detached (the content is what precedes it), names its
signer by issuer and serial number, and carries no certificate: the key must be in the host's
keyring, given at ``mkctl init --keyring``. What the real kernel returns, and so the emulator:

- a signature that does not verify (tampered content, a malformed trailer or message,
  authenticated attributes, content that is not pkcs7-data): EKEYREJECTED;
- a signer the keyring does not hold: ENOKEY (``pkcs7_validate_trust``);
- an image with no signature where signatures are required (``KEXEC_SIG_FORCE``/lockdown, here
  ``--require-signed``): EKEYREJECTED, as the appended-signature check says of a missing marker;
- without that requirement a signature that fails is logged and the image loads anyway, as
  ``kimage_validate_signature`` does.

The host reads the image once, checks it, and hands the checked bytes to the instance's loader,
so a file changed after the check is never what runs. The content of an emulated kernel is Python
source, or an ELF file carrying it (kimage.py: ``kerf sign`` signs ELF images only).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from partition.errors import InvalidSpec, KeyRejected, KeyUnavailable, MKError

MODULE_SIG_STRING = b"~Module signature appended~\n"
PKEY_ID_PKCS7 = 2
#: struct module_signature: algo, hash, id_type, signer_len, key_id_len, __pad[3], __be32 sig_len
SIG_INFO = struct.Struct(">BBBBB3sI")
#: the largest image the host reads (a real vmlinux is tens of MiB; an emulated one is KiBs)
MAX_IMAGE = 64 << 20

_OID_DATA = "1.2.840.113549.1.7.1"
_OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
_HASHES = {"2.16.840.1.101.3.4.2.1": "sha256", "2.16.840.1.101.3.4.2.2": "sha384",
           "2.16.840.1.101.3.4.2.3": "sha512"}
_RSA = {"1.2.840.113549.1.1.1", "1.2.840.113549.1.1.11", "1.2.840.113549.1.1.12",
        "1.2.840.113549.1.1.13"}
_ECDSA = {"1.2.840.10045.4.3.2", "1.2.840.10045.4.3.3", "1.2.840.10045.4.3.4"}


def split(data: bytes) -> tuple[bytes, bytes] | None:
    """(content, PKCS#7) of a signed image; None when it carries no marker. A marker over a
    trailer that does not parse is EKEYREJECTED (the kernel's checks, in its order)."""
    if not data.endswith(MODULE_SIG_STRING):
        return None
    end = len(data) - len(MODULE_SIG_STRING)
    if end < SIG_INFO.size:
        raise _rejected("its signature marker has no signature information before it")
    algo, hash_id, id_type, signer_len, key_id_len, pad, sig_len = \
        SIG_INFO.unpack_from(data, end - SIG_INFO.size)
    end -= SIG_INFO.size
    if sig_len >= end:
        raise _rejected(f"its signature length {sig_len} exceeds the image")
    if id_type != PKEY_ID_PKCS7:
        raise _rejected(f"its signature is of type {id_type}, not PKCS#7")
    if algo or hash_id or signer_len or key_id_len or pad != b"\0\0\0":
        raise _rejected("its PKCS#7 signature information has non-zero fields")
    return data[:end - sig_len], data[end - sig_len:end]


def _rejected(why: str) -> KeyRejected:
    return KeyRejected(f"kernel signature verification failed: {why}",
                       "sign the image again: kerf sign KERNEL -o OUT --key KEY --cert CERT")


# -- DER, as far as a PKCS#7 SignedData needs it ---------------------------------------------------
class _Der:
    """A bounded DER reader: every length is checked against what is left."""

    def __init__(self, data: bytes, at: int = 0, end: int | None = None) -> None:
        self.data, self.at, self.end = data, at, len(data) if end is None else end

    def more(self) -> bool:
        return self.at < self.end

    def peek(self) -> int:
        if self.at >= self.end:
            raise _rejected("its PKCS#7 message ends early")
        return self.data[self.at]

    def take(self, tag: int | None = None) -> tuple[int, int, int, int]:
        """(tag, start of the whole TLV, start of the value, end) of the next element."""
        start = self.at
        if self.at + 2 > self.end:
            raise _rejected("its PKCS#7 message ends early")
        t, n = self.data[self.at], self.data[self.at + 1]
        self.at += 2
        if n & 0x80:
            k = n & 0x7F
            if not 1 <= k <= 4 or self.at + k > self.end:
                raise _rejected("its PKCS#7 message has a bad length")
            n = int.from_bytes(self.data[self.at:self.at + k], "big")
            self.at += k
        if self.at + n > self.end:
            raise _rejected("its PKCS#7 message has an element longer than itself")
        if tag is not None and t != tag:
            raise _rejected(f"its PKCS#7 message has tag {t:#x} where {tag:#x} belongs")
        value = self.at
        self.at += n
        return t, start, value, self.at

    def inner(self, tag: int) -> _Der:
        _, _, value, end = self.take(tag)
        return _Der(self.data, value, end)

    def oid(self) -> str:
        _, _, v, end = self.take(0x06)
        raw = self.data[v:end]
        if not raw:
            raise _rejected("its PKCS#7 message has an empty OID")
        arcs = [raw[0] // 40, raw[0] % 40]
        acc = 0
        for b in raw[1:]:
            acc = (acc << 7) | (b & 0x7F)
            if not b & 0x80:
                arcs.append(acc)
                acc = 0
        return ".".join(map(str, arcs))

    def integer(self) -> int:
        _, _, v, end = self.take(0x02)
        return int.from_bytes(self.data[v:end], "big", signed=True)


@dataclass
class SignerInfo:
    issuer: bytes          # DER of the issuer Name
    serial: int
    digest: str            # sha256 | sha384 | sha512
    algorithm: str         # signature algorithm OID
    signature: bytes


def parse_pkcs7(msg: bytes) -> list[SignerInfo]:
    """The signers of a detached PKCS#7 SignedData over pkcs7-data without authenticated
    attributes (what the kernel accepts for a kexec image's appended signature)."""
    top = _Der(msg)
    ci = top.inner(0x30)
    if ci.oid() != _OID_SIGNED_DATA:
        raise _rejected("its PKCS#7 message is not SignedData")
    sd = ci.inner(0xA0).inner(0x30)
    sd.integer()                                       # version
    sd.take(0x31)                                      # digestAlgorithms
    encap = sd.inner(0x30)
    if encap.oid() != _OID_DATA:
        raise _rejected("its PKCS#7 content is not pkcs7-data")
    if encap.more():
        raise _rejected("its PKCS#7 message is not detached (it carries the content)")
    while sd.more() and sd.peek() in (0xA0, 0xA1):     # certificates, crls: not used
        sd.take()
    infos = sd.inner(0x31)
    out = []
    while infos.more():
        si = infos.inner(0x30)
        si.integer()
        ias = si.inner(0x30)
        _, istart, _, iend = ias.take(0x30)
        issuer = msg[istart:iend]
        serial = ias.integer()
        dig = si.inner(0x30).oid()
        if si.peek() == 0xA0:
            raise _rejected("its PKCS#7 signature has authenticated attributes")
        alg = si.inner(0x30).oid()
        _, _, v, end = si.take(0x04)
        if dig not in _HASHES:
            raise _rejected(f"its digest algorithm {dig} is not sha256/384/512")
        out.append(SignerInfo(issuer, serial, _HASHES[dig], alg, msg[v:end]))
    if not out:
        raise _rejected("its PKCS#7 message has no signer")
    return out


# -- the keyring -----------------------------------------------------------------------------------
class Keyring:
    """The X.509 certificates the host trusts for kexec images: a PEM file (one or more
    certificates), a DER certificate, or a directory of them."""

    def __init__(self, path: str) -> None:
        try:
            from cryptography import x509  # (kerf's own dependency: its sign uses it)
        except ImportError:
            raise InvalidSpec("a keyring needs the 'cryptography' package to read certificates "
                              "and verify signatures, and it is not installed",
                              "pip install cryptography (kerf-multikernel brings it too)") \
                from None
        self.path = os.path.abspath(path)
        files = [self.path]
        if os.path.isdir(self.path):
            files = sorted(os.path.join(self.path, f) for f in os.listdir(self.path))
            files = [f for f in files if os.path.isfile(f)]
        self.certs: list[Any] = []
        for f in files:
            try:
                with open(f, "rb") as fh:
                    data = fh.read(1 << 20)
            except OSError as exc:
                raise InvalidSpec(f"keyring {f}: {exc.strerror}",
                                  "give a PEM/DER certificate file or a directory of them") \
                    from None
            try:
                if b"-----BEGIN CERTIFICATE" in data:
                    self.certs += x509.load_pem_x509_certificates(data)
                else:
                    self.certs.append(x509.load_der_x509_certificate(data))
            except ValueError as exc:
                raise InvalidSpec(f"keyring {f} holds no X.509 certificate: {exc}",
                                  "give the certificate kerf sign was given (--cert)") from None
        if not self.certs:
            raise InvalidSpec(f"keyring {path} holds no certificate",
                              "give the certificate kerf sign was given (--cert)")

    def subjects(self) -> list[str]:
        return [c.subject.rfc4514_string() for c in self.certs]

    def find(self, issuer: bytes, serial: int) -> Any | None:
        for c in self.certs:
            if c.serial_number == serial and c.issuer.public_bytes() == issuer:
                return c
        return None

    def verify(self, content: bytes, pkcs7: bytes) -> str:
        """The subject of the key that signed ``content``; KeyUnavailable when no signer is in
        the keyring, KeyRejected when a signer's signature does not verify."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
        signers = parse_pkcs7(pkcs7)
        for s in signers:
            cert = self.find(s.issuer, s.serial)
            if cert is None:
                continue
            algorithm: hashes.HashAlgorithm = {"sha256": hashes.SHA256(),
                                               "sha384": hashes.SHA384(),
                                               "sha512": hashes.SHA512()}[s.digest]
            key = cert.public_key()
            try:
                if isinstance(key, rsa.RSAPublicKey) and s.algorithm in _RSA:
                    key.verify(s.signature, content, padding.PKCS1v15(), algorithm)
                elif isinstance(key, ec.EllipticCurvePublicKey) and s.algorithm in _ECDSA:
                    key.verify(s.signature, content, ec.ECDSA(algorithm))
                else:
                    raise _rejected(f"its signature algorithm {s.algorithm} does not match "
                                    f"the key of {cert.subject.rfc4514_string()}")
            except InvalidSignature:
                raise _rejected(f"the signature by {cert.subject.rfc4514_string()} does not "
                                "match the image (changed after signing?)") from None
            return str(cert.subject.rfc4514_string())
        raise KeyUnavailable("kernel signature verification failed: the image is signed by a "
                             "key the host's keyring does not hold",
                             f"add the signer's certificate to the keyring ({self.path}), or "
                             "sign with a key it holds")


# -- the host's check at load ----------------------------------------------------------------------
@dataclass
class Checked:
    image: bytes        # what the loader imports (b"": the spec as it is, unchanged)
    signature: str      # "" | "verified: <subject>" | "unverified: <why>"
    #: the file as it was read, signature and all (b"" where ``image`` is): what a new host
    #: checks again (check_data) before it runs it at a restart (host/adoption.py)
    file: bytes = b""


def check_image(spec: str, keyring: Keyring | None, required: bool) -> Checked:
    """What ``kexec load`` of ``spec`` may run, checked as kexec_file_load checks a kernel:
    the file read once (bounded), its appended signature verified against ``keyring``;
    ``required``: an unsigned or unverified image is refused. The ELF form is unpacked (the
    loader receives Python source). Nothing here imports or runs the image."""
    from partition.guest.loader import split_spec
    target, _ = split_spec(spec)
    if not os.path.isfile(target):
        if required:
            raise KeyRejected(f"kernel {spec!r} is a module, which carries no signature, and "
                              "this machine requires signed images",
                              "load a signed image file (kerf sign, mkctl pack)")
        return Checked(b"", "")
    try:
        with open(target, "rb") as f:
            data = f.read(MAX_IMAGE + 1)
    except OSError as exc:
        from partition.errors import BadKernelImage
        raise BadKernelImage(f"kernel file {target!r} cannot be read: {exc.strerror}",
                             "give a readable file") from None
    if len(data) > MAX_IMAGE:
        raise InvalidSpec(f"kernel file {target!r} is over {MAX_IMAGE >> 20} MiB",
                          "an emulated kernel is a Python file of a few KiB")
    return check_data(spec, data, keyring, required)


def check_data(spec: str, data: bytes, keyring: Keyring | None, required: bool) -> Checked:
    """``check_image`` of the file's bytes, read already: a new host checks a dead host's image
    again with them, under its own keyring and requirement, rather than trust its state file."""
    from partition.guest.loader import split_spec
    from partition.host.kimage import ELF_MAGIC, unpack_elf
    target, _ = split_spec(spec)
    file = data
    signature = ""
    try:
        parts = split(data)
        if parts is None:
            if required:
                raise KeyRejected(f"kernel {target!r} is not signed and this machine requires "
                                  "signed images (KEXEC_SIG_FORCE)",
                                  "sign it: kerf sign IMAGE -o SIGNED --key KEY --cert CERT")
        else:
            content, pkcs7 = parts
            data = content
            if keyring is None:
                raise KeyUnavailable("kernel signature verification failed: the host has no "
                                     "keyring", "mkctl init --keyring CERT")
            signature = "verified: " + keyring.verify(content, pkcs7)
    except (KeyRejected, KeyUnavailable) as exc:
        if required:
            raise
        # (logged, and loaded as the kernel would: the content when the trailer parsed, the
        # whole file when it did not, which the loader then refuses if it is no kernel)
        signature = f"unverified: {exc.message} [{exc.code}]"
    if data.startswith(ELF_MAGIC):
        data = unpack_elf(data)
    elif not signature:
        return Checked(b"", "")          # an unsigned Python file: loaded by its path, as ever
    return Checked(data, signature, file)



class ImageCheck:
    """kexec_file_load's signature check as one machine runs it: against its keyring, refusing
    an unsigned or unverified image when it requires signatures, each outcome an event."""

    def __init__(self, keyring: Keyring | None, required: bool, events: Any) -> None:
        self.keyring = keyring
        self.required = required
        self.events = events

    def __call__(self, inst: Any, kimage: Any, file: bytes | None = None) -> None:
        """A refusal leaves the instance as it was; the checked image goes to the loader.
        ``file``: the image's bytes, read already (a dead host's, which a new host checks
        again: host/adoption.py)."""
        try:
            checked = check_image(kimage.spec, self.keyring, self.required) if file is None \
                else check_data(kimage.spec, file, self.keyring, self.required)
        except MKError as exc:
            self.events.warning("kimage_rejected", instance=inst.id, name=inst.name,
                                kernel=kimage.spec, error=exc.message, code=exc.code)
            raise
        kimage.image, kimage.signature, kimage.file = \
            checked.image, checked.signature, checked.file
        if checked.signature.startswith("unverified"):
            self.events.warning("kimage_signature_unverified", instance=inst.id, name=inst.name,
                                kernel=kimage.spec, why=checked.signature)
        elif checked.signature:
            self.events.info("kimage_signature_verified", instance=inst.id, name=inst.name,
                             kernel=kimage.spec, signer=checked.signature)
