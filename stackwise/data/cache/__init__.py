"""The activation cache: hidden states after layer k, written once by `trainer.predict`, read by stage k+1.

Layout of one cache folder (`ExperimentPaths.acts_dir(k)`; file names come from layout.py only):

    train/r{rank}_s{shard:05d}.{field}.npy     one .npy per field per shard, fields below
    val/r{rank}_s{shard:05d}.{field}.npy
    records_r{rank}.json                       what each rank wrote (gathered into the manifest)
    manifest.json                              written LAST: its presence marks the cache complete

Per cached row (one masked view of one sequence):

    hidden  (T, D)  float32 | float16 | bfloat16 (its uint16 bits: numpy has no bf16)
                    | float8_e4m3 (its uint8 bits, read back as bfloat16)
    scale   (T,)    float32, float8_e4m3 only: hidden[t] = e4m3 value * scale[t] (amax over D / 448)
    targets (T,)    uint16 when vocab_size <= 65536 else int32 (read back as int64)
    mask    (T,)    bool, True where the input id was replaced by [MASK]
    t       ()      float32 masking rate
    index   ()      int64 example index in its split
    view    ()      int16 mask view (read back as int64)

Why .npy shards: `np.load(mmap_mode="r")` maps them without reading (a split is never loaded
whole) and the format has no pickle. Each rank names its own shards (`r{rank}_`), so DDP ranks
never collide and no cross-rank gather (which would pickle) is needed: ranks leave their shard
records in JSON files that rank 0 folds into the manifest. The manifest is the commit point: it
is written after every shard is complete and fsync'ed, so a crash leaves only files that no
manifest lists, which the next writer removes.

Modules: layout.py (names, dtypes on disk, the fp8 codec, the manifest), sink.py (the shard files,
written and hashed by threads behind a bounded queue), writer.py (`CacheWriter`, the Lightning
prediction writer), reader.py (`ActivationCache`, `ActivationDataset`), datamodule.py
(`ActivationDataModule`, and `RecomputedDataModule`: the same rows as token batches, for a stage
that recomputes its input), store.py (where stage k's input lives, `cache.store`, and how `auto`
picks it).
"""
