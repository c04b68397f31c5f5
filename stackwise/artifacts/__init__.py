"""The experiment folder: every file name, every atomic write, every checkpoint read.

Only this package knows where things live under `exp_dir = <output_root>/<experiment>/`:

    layers/layer_{k}.pt                    stage k's LayerWeights + metadata (torch.save, weights_only-loadable)
    layers/layer_{k}.head.safetensors      an untied output projection: the latest stage's only
    layers/layer_{k}.top.safetensors       the top segment (layerwise.top_layers > 0): the latest stage's only
    acts/acts_layer{k}/{train,val}/...     activation shards; acts/acts_layer{k}/manifest.json (written last)
    fused/model.safetensors, fused/config.json (+ fused/finetuned/{model.safetensors,config.json})
    e2e/model.safetensors, e2e/config.json
        (a model past 5 GB: model-0000i-of-0000N.safetensors + model.safetensors.index.json instead)
    ckpt/<stage>/                          Lightning ModelCheckpoint folder (mid-stage resume)
    tb/                                    TensorBoard root (one run per stage)
    tokens/                                token cache
    results.json                           one summary record per stage
    import.json                            what stackwise-import started the experiment from (if it did)
    eval.json                              stackwise-eval's report
    run.lock                               held (OS file lock) by the run writing here; see stackwise/lock.py
    hydra/                                 Hydra's run logs

Why atomic writes everywhere: a run killed mid-write must never leave a file that a later run
would trust (atomic.py). Why no pickle: opening a checkpoint must never run code, so `torch.load`
is always called with `weights_only=True` (checkpoints.py) and models ship as safetensors (models.py).

    paths.py        ExperimentPaths: the file names above
    atomic.py       atomic writes, OS write errors as ArtifactWriteError, hashing while writing
    messages.py     one-line messages; an artifact's metadata checked against this run's
    checkpoints.py  layer checkpoints (layers/layer_k.pt) and the tensor digest
    models.py       safetensors model folders (one file or sharded) and `load_model`
    results.py      results.json
"""

from stackwise.artifacts.atomic import (
    HashingWriter,
    atomic_open,
    atomic_path,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_stream,
    os_error_in,
    sha256_file,
    write_errors,
)
from stackwise.artifacts.checkpoints import (
    LAYER_FORMAT,
    LAYER_FORMAT_VERSION,
    load_layer_checkpoint,
    read_layer_meta,
    save_layer_checkpoint,
    state_digest,
)
from stackwise.artifacts.messages import check_expected, one_line
from stackwise.artifacts.models import (
    MAX_SHARD_BYTES,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    begin_model_write,
    load_model,
    load_safetensors_model,
    model_files,
    read_model_meta,
    rewrite_model_meta,
    save_safetensors_model,
    write_model_manifest,
    write_model_weights,
)
from stackwise.artifacts.paths import (
    MODEL_COMMANDS,
    ExperimentPaths,
    PathLike,
    manifest_path,
    top_segment_path,
    untied_head_path,
)
from stackwise.artifacts.results import read_results, record_result

__all__ = [
    "LAYER_FORMAT",
    "LAYER_FORMAT_VERSION",
    "MAX_SHARD_BYTES",
    "MODEL_COMMANDS",
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "ExperimentPaths",
    "HashingWriter",
    "PathLike",
    "atomic_open",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_stream",
    "begin_model_write",
    "check_expected",
    "load_layer_checkpoint",
    "load_model",
    "load_safetensors_model",
    "manifest_path",
    "model_files",
    "one_line",
    "os_error_in",
    "read_layer_meta",
    "read_model_meta",
    "read_results",
    "record_result",
    "rewrite_model_meta",
    "save_layer_checkpoint",
    "save_safetensors_model",
    "sha256_file",
    "state_digest",
    "top_segment_path",
    "untied_head_path",
    "write_errors",
    "write_model_manifest",
    "write_model_weights",
]
