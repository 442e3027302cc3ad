"""Bring your own adapter: a tenant uploads a peft LoRA adapter as a new version of a name.

The upload is a tar of the adapter's directory (what `GET .../versions/{n}/files` gives back):
`adapter_config.json` and `adapter_model.safetensors`, at its top or under one folder. It
streams to a bounded spool file, is unpacked (regular files only, known names only), and
inspected without torch: the config, and the safetensors header's tensor names, shapes and
dtypes, compared with the base model's own weight shapes where the base is on this machine.

`inspect` writes the report: everything that would stop the version being served (peft type,
base model, rank against the pool's max, target modules, modules_to_save, DoRA, bias, dtypes,
shapes, size). A servable adapter becomes a `candidate` version like a trained one, with
`lineage.source = "upload"`; one with problems is refused (400, the problems in the message)
and nothing is stored. `check_only` answers the report without registering.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sqlmodel import Session

from api.errors import InvalidRequest, PayloadTooLarge
from api.models.adapters import Adapter, AdapterVersion
from api.models.tenants import Tenant, new_id
from api.services import quotas
from api.services.jobs import tenant_slug
from api.services.registry import (
    FULL,
    REQUIRED_FILES,
    add_version,
    compatibility_problems,
    get_or_create_adapter,
    modules_of,
    safetensors_header,
    stored_files,
)
from api.settings import Settings
from api.storage import ArtifactStore
from trainer.base_models import needs_conversion, resolve_base_model
from trainer.errors import BaseModelError

# Weights a serving engine computes with; anything else (int8, packed 4-bit) is a quantized
# adapter that neither vLLM nor peft would load as LoRA.
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})
MAX_MEMBERS = 64  # an adapter directory holds a handful of files; a bound on the tar's index
MAX_CONFIG_BYTES = 1 << 20
PICKLED = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


class AdapterRefused(InvalidRequest):
    default_code = "adapter_not_servable"


@dataclass
class AdapterSpool:
    """A tar arriving chunk by chunk, spooled to a local temp file (bounded)."""

    max_bytes: int
    filename: str = ""
    room: quotas.StorageRoom | None = None
    size: int = 0
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="loraplex-upload-")))

    def __post_init__(self) -> None:
        self._file = open(self.dir / "upload.tar", "wb")  # noqa: SIM115 - closed in finish/abort

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.abort()
            raise PayloadTooLarge(
                f"The adapter exceeds the upload limit of {self.max_bytes} bytes.", param="file"
            )
        if self.room is not None:
            try:
                self.room.check(self.size)
            except InvalidRequest:
                self.abort()
                raise
        self._file.write(chunk)

    def abort(self) -> None:
        self._file.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def unpack(self) -> tuple[Path, list[str]]:
        """(directory holding the adapter's files, names in the tar that were ignored)."""
        self._file.close()
        out = self.dir / "adapter"
        out.mkdir()
        ignored: list[str] = []
        try:
            with tarfile.open(self.dir / "upload.tar", mode="r:*") as tar:
                members = []
                for i, member in enumerate(tar):
                    if i >= MAX_MEMBERS:
                        raise _refused(f"the tar holds more than {MAX_MEMBERS} entries")
                    members.append(member)
                prefix = _common_folder([m.name for m in members if m.isfile()])
                unpacked = 0
                for member in members:
                    name = PurePosixPath(member.name)
                    if member.isdir():
                        continue
                    # Outside the folder (a link beside it) a name is never one of ours.
                    rel = str(name)  # PurePosixPath drops a leading "./"
                    if prefix is not None and name.is_relative_to(prefix):
                        rel = str(name.relative_to(prefix))
                    if rel in PICKLED:
                        raise _refused(
                            f"{rel}: pickled weights are not accepted (loading them runs code); "
                            "save the adapter with safetensors (peft's default)"
                        )
                    if not member.isfile() or rel not in REQUIRED_FILES:
                        ignored.append(member.name)
                        continue
                    unpacked += member.size
                    if unpacked > self.max_bytes:  # a compressed tar that unpacks huge
                        raise PayloadTooLarge(
                            f"Unpacked, the adapter exceeds the upload limit of "
                            f"{self.max_bytes} bytes.",
                            param="file",
                        )
                    source = tar.extractfile(member)
                    assert source is not None
                    with source, open(out / rel, "wb") as target:
                        shutil.copyfileobj(source, target)
        except (tarfile.TarError, EOFError) as e:
            raise _refused(
                "the upload is not a readable tar archive (plain, or gzip, bzip2 or xz "
                f"compressed): {str(e).splitlines()[-1].strip(' -')}"
            ) from e
        return out, ignored


def _common_folder(names: list[str]) -> PurePosixPath | None:
    """The single folder all files sit in (`adapter/…`, `./…`), if any."""
    parents = {PurePosixPath(n).parent for n in names}
    if len(parents) == 1:
        parent = parents.pop()
        return parent if str(parent) != "." else None
    return None


def _refused(message: str) -> AdapterRefused:
    return AdapterRefused(f"Adapter refused: {message}.", param="file")


def local_base_dir(name: str, *, settings: Settings) -> Path | None:
    """The base model's directory when it is on this machine already (no conversion, no
    download: an upload must not wait minutes); None when it is not."""
    if needs_conversion(name, home=settings.home):
        return None
    path = Path(name).expanduser()
    if name not in settings.registered_base_models() and not path.is_dir():
        return None
    try:
        return resolve_base_model(settings.registered_base_models().get(name, name),
                                  home=settings.home)  # fmt: skip
    except BaseModelError:
        return None


def base_weight_shapes(base_dir: Path) -> dict[str, list[int]]:
    """Module name -> [out_features, in_features] of the base's 2-D weights."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        for name, info in safetensors_header(path).items():
            shape = info.get("shape") or []
            if name.endswith(".weight") and len(shape) == 2:
                shapes[name.removesuffix(".weight")] = [int(n) for n in shape]
    return shapes


def _module_of(tensor: str) -> tuple[str, str] | None:
    """`base_model.model.X.lora_A.weight` -> ("X", "A"); None for a non-LoRA tensor."""
    for side in ("A", "B"):
        marker = f".lora_{side}."
        if marker in tensor:
            module = tensor.split(marker, 1)[0].removeprefix("base_model.model.")
            return module, side
    return None


def inspect(
    adapter_dir: Path, *, base_model: str, settings: Settings, ignored: list[str]
) -> dict[str, Any]:
    """The upload-time report: what the adapter is, and what would stop it being served."""
    files = {p.name for p in adapter_dir.iterdir() if p.is_file()}
    problems: list[str] = []
    config: dict[str, Any] = {}
    config_path = adapter_dir / "adapter_config.json"
    if config_path.is_file():
        if config_path.stat().st_size > MAX_CONFIG_BYTES:
            problems.append(f"adapter_config.json is larger than {MAX_CONFIG_BYTES} bytes")
        else:
            try:
                loaded = json.loads(config_path.read_text())
                config = loaded if isinstance(loaded, dict) else {}
                if not config:
                    problems.append("adapter_config.json is not a JSON object")
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                problems.append(f"adapter_config.json is not JSON ({e})")
    header: dict[str, Any] = {}
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        try:
            header = safetensors_header(weights)
        except ValueError as e:
            problems.append(f"adapter_model.safetensors is not a valid safetensors file ({e})")
    shapes = {k: [int(n) for n in v.get("shape", [])] for k, v in header.items()}
    dtypes = sorted({str(v.get("dtype")) for v in header.values()})
    trained_on = config.get("base_model_name_or_path")
    if config:
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type != "LORA":
            problems.append(f"peft_type is {config.get('peft_type')!r}; only LORA adapters serve")
        if config.get("use_dora"):
            problems.append("use_dora is set; DoRA adapters are not served")
        if config.get("bias", "none") != "none":
            problems.append(f"bias is {config.get('bias')!r}; only 'none' is served")
        try:
            problems += compatibility_problems(
                {**config, "base_model_name_or_path": base_model},  # the base is chosen here
                base_model=base_model,
                max_rank=settings.max_lora_rank,
                files=files,
                shapes=shapes if header else None,
            )
        except (TypeError, ValueError) as e:
            problems.append(f"adapter_config.json has an unreadable rank ({e})")
    else:
        problems += [f"missing {name}" for name in REQUIRED_FILES if name not in files]
    odd = sorted(set(dtypes) - FLOAT_DTYPES)
    if odd:
        problems.append(f"weights of dtype {', '.join(odd)}; LoRA weights must be F32, F16 or BF16")
    strays = sorted(k for k in shapes if _module_of(k) is None)
    if strays:
        problems.append(
            f"{len(strays)} tensor(s) are not LoRA weights (e.g. {strays[0]}); "
            "full-weight or embedding modules are not served"
        )
    base_dir = local_base_dir(base_model, settings=settings)
    if base_dir is not None and shapes:
        problems += _shape_problems(shapes, base_weight_shapes(base_dir))
    size = sum((adapter_dir / f).stat().st_size for f in files)
    return {
        "object": "adapter.upload_report",
        "servable": not problems,
        "problems": problems,
        "base_model": base_model,
        "trained_on": trained_on,
        "peft_type": config.get("peft_type"),
        "rank": config.get("r"),
        "max_rank": settings.max_lora_rank,
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        # What the weights adapt, by module kind (a config may say "all-linear" or a regex).
        "adapted_modules": sorted(
            {found[0].rsplit(".", 1)[-1] for k in shapes if (found := _module_of(k))}
        ),
        "modules_to_save": config.get("modules_to_save"),
        "dtypes": dtypes,
        "tensors": len(shapes),
        "size_bytes": size,
        "shapes_checked_against_base": base_dir is not None,
        "ignored_files": ignored,
    }


def _shape_problems(shapes: dict[str, list[int]], base: dict[str, list[int]]) -> list[str]:
    """LoRA A is (rank, in_features) and B (out_features, rank) of the module it adapts."""
    missing: set[str] = set()
    wrong: list[str] = []
    for tensor, shape in sorted(shapes.items()):
        found = _module_of(tensor)
        if found is None or len(shape) != 2:
            continue
        module, side = found
        if module not in base:
            missing.add(module)
            continue
        out_features, in_features = base[module]
        got, want = (shape[1], in_features) if side == "A" else (shape[0], out_features)
        if got != want:
            wrong.append(f"{tensor} fits {got} features, the base's {module} has {want}")
    problems = []
    if missing:
        example = sorted(missing)[0]
        problems.append(
            f"{len(missing)} adapted module(s) do not exist in the base model (e.g. {example}): "
            "it was trained on another architecture"
        )
    if wrong:
        problems.append(
            f"{len(wrong)} tensor(s) do not fit the base model's shapes (e.g. {wrong[0]}): "
            "it was trained on another model"
        )
    return problems


def _adapter_for(session: Session, *, tenant_id: str, name: str, base_model: str) -> Adapter:
    adapter = get_or_create_adapter(session, tenant_id=tenant_id, name=name, base_model=base_model)
    if adapter.base_model != base_model:
        raise InvalidRequest(
            f"Adapter {name!r} serves base {adapter.base_model!r}; a version on "
            f"{base_model!r} needs another name.",
            param="base_model",
            code="base_model_mismatch",
        )
    return adapter


def check_base_model(base_model: str, settings: Settings) -> None:
    if base_model not in settings.registered_base_models():
        known = ", ".join(sorted(settings.registered_base_models()))
        raise InvalidRequest(
            f"{base_model!r} is not a base model of this deployment ({known}).",
            param="base_model",
            code="model_not_found",
        )


def register_upload(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    *,
    tenant: Tenant,
    name: str,
    base_model: str,
    adapter_dir: Path,
    report: dict[str, Any],
    filename: str,
) -> AdapterVersion:
    """Store the files and add a `candidate` version (commits); the caller checked the
    report. The stored config names the base it is registered on; lineage keeps the
    original."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": base_model}))
    quotas.check_storage_quota(
        session, settings, tenant_id=tenant.id, extra_bytes=int(report["size_bytes"])
    )
    adapter = _adapter_for(session, tenant_id=tenant.id, name=name, base_model=base_model)
    version_id = new_id("adv-")
    prefix = f"adapters/{tenant.id}/{name}/upload-{version_id}"
    stored = store.put_dir(prefix, adapter_dir)
    try:
        version = add_version(
            session,
            adapter,
            id=version_id,
            tenant_id=tenant.id,
            job_id=None,
            fine_tuned_model=(
                f"ft:{base_model}:{tenant_slug(tenant)}:{name}:{version_id.removeprefix('adv-')[:8]}"
            ),
            base_model=base_model,
            storage_prefix=prefix,
            files=stored_files(stored),
            size_bytes=sum(v.size for v in stored.values()),
            rank=int(config.get("r", 0)),
            target_modules=report["adapted_modules"] or modules_of(config.get("target_modules")),
            metrics={
                # Not trained here: nothing measured yet, numerics unknown.
                "numerics": {"trained": "unknown", "validated": [], "served": FULL},
                "upload_report": report,
            },
            lineage={
                "source": "upload",
                "filename": filename,
                "trained_on": report.get("trained_on"),
                "parent": None,
            },
        )
        session.commit()
    except BaseException:
        session.rollback()
        for key in stored:
            store.delete(f"{prefix}/{key}")
        raise
    return version
