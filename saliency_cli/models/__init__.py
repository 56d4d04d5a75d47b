"""Model loading: the bundled default, timm names and model folders, torchvision builders, local checkpoints,
TorchScript and torch.export files, Hugging Face transformers classifiers. One module per source (default,
timm_source, torchvision_source, programs, transformers_source) over the modules they share (checkpoints,
fitting, labels, data_config, provenance, outputs, messages, loaded); `load_model` (loader) is the one entry
point.

Every loaded model carries its input contract (`data_config`: input size, interpolation, crop, mean, std),
taken from timm's `resolve_model_data_config`, from the named torchvision weights' own transforms, from a
transformers model's image processor or, for TorchScript and torch.export files, from the user (options or a
sidecar JSON). We never assume ImageNet preprocessing silently.

Every loaded model also says what it is (`source`: kind, name, options, which part of a checkpoint was taken and
the sha256 of every file read). It goes into run.json and into each job's identity, so changing a file's bytes
redoes the work, and `load_model_from_source` reloads exactly that model later. Checkpoints are read as data:
pickled code never runs.
"""

from saliency_cli.models.checkpoints import read_state_dict
from saliency_cli.models.data_config import _merge_config, _normalise_config
from saliency_cli.models.in_memory import in_memory_model, module_data_config, module_probability
from saliency_cli.models.labels import (
    attach_default_labels,
    check_labels,
    imagenet_labels,
    labels_before_loading,
    num_classes,
    read_labels,
)
from saliency_cli.models.loaded import (
    DEFAULT_MODEL,
    OPTION_KEYS,
    TORCHVISION_PREFIX,
    LoadedModel,
    find_class,
    resolve_device,
)
from saliency_cli.models.loader import load_model, load_model_from_source
from saliency_cli.models.outputs import LogitsOnly, logits_of
from saliency_cli.models.programs import ExportedModule
from saliency_cli.models.provenance import file_sha256, state_dict_sha256
from saliency_cli.models.torchvision_source import _torchvision_data_config
from saliency_cli.models.transformers_source import TRANSFORMERS_PREFIX, data_config_from, describe_processor

__all__ = [
    "DEFAULT_MODEL", "OPTION_KEYS", "TORCHVISION_PREFIX", "TRANSFORMERS_PREFIX", "data_config_from",
    "describe_processor", "module_probability", "ExportedModule", "LoadedModel", "LogitsOnly",
    "_merge_config", "_normalise_config", "_torchvision_data_config", "attach_default_labels", "check_labels",
    "file_sha256", "find_class", "imagenet_labels", "in_memory_model", "labels_before_loading", "load_model",
    "load_model_from_source", "logits_of",
    "module_data_config", "num_classes", "read_labels", "read_state_dict", "resolve_device", "state_dict_sha256",
]
