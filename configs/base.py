"""Base config: the paper's settings (flux-dev + LoRA r128, lr 1e-4, batch 1, 512x512).

A subtask config imports this and changes a few fields; any field can be
overridden on the command line, e.g. `--config.train.steps=100`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.preset = "flux-dev"  # dd_jax.models.flux.PRESETS key (architecture when training from scratch)
    m.params = ml_collections.ConfigDict()  # FluxParams overrides, e.g. hidden_size
    m.checkpoint = ""  # converted transformer folder (scripts/convert_flux.py); "" = from scratch
    m.weights = ""  # a converted pipeline folder (convert_flux.py --output): fills checkpoint, autoencoder.path,
    #                 text.encoders from its transformer/, vae/, t5/+clip/ where those are ""
    m.init = "default"  # from scratch only: "default" | "adaln_zero" (DiT: blocks start as identity, output 0)
    m.param_dtype = "bfloat16"
    m.compute_dtype = "bfloat16"
    m.attention = "xla"  # "xla" | "cudnn" | "splash" | "auto" (dd_jax.models.layers)
    m.platform = ""  # platform the model is traced for ("cuda" | "tpu" | "cpu"): "" = the current backend; set it
    #                  to lower ahead of time for another platform (attention kernels depend on it)
    m.scan_layers = False  # stack blocks and run them with nnx.scan (one compiled block)
    m.remat = "none"  # per-block rematerialisation policy (dd_jax.models.flux.REMAT_POLICIES)
    m.rope_in_norm = True  # RoPE inside the q/k RMSNorm's float32 pass (False: after it, as BFL's code orders it)
    m.quantize = ""  # "int8" | "fp8" | "int4" | "fp8_w8a8": frozen base (LoRA) and T5 quantized (dd_jax.quantize)

    c.lora = lo = ml_collections.ConfigDict()
    lo.enabled = True
    lo.rank = 128
    lo.alpha = 128.0
    lo.targets = tuple(__import__("dd_jax.lora", fromlist=["x"]).DEFAULT_TARGETS)
    lo.modulation = False

    c.autoencoder = ae = ml_collections.ConfigDict()
    ae.kind = "flux"  # "flux" (converted VAE folder) | "pixel" (space-to-depth, no weights)
    ae.path = ""
    ae.preset = "flux"  # architecture when built without weights (ahead-of-time compilation, tests)
    ae.factor = 8  # pixel autoencoder only

    c.text = tx = ml_collections.ConfigDict()
    tx.kind = "precomputed"  # "precomputed" (txt/vec in the batch, e.g. cached T5/CLIP) | "task" (learned)
    tx.length = 8  # learned task tokens ("task" only)
    # text-embedding cache (python -m dd_jax.data.encode_text) for training and prompts ("" = data.dir/text_cache)
    tx.cache = ""
    tx.online = False  # training: encode captions in the input pipeline with text.encoders instead of the cache
    tx.encoders = ""  # converted T5/CLIP folder for prompts not in the cache ("" = model.weights)

    c.icd = ic = ml_collections.ConfigDict()
    ic.targets = ("x", "y")  # noisy layers after the condition z: foreground x, background y
    ic.lpec = True  # Layer Position Encoding Cloning: z and y share RoPE ids
    ic.cloned = ("y",)
    ic.offset = "index"  # x ids: "index" (1, r, c) as Kontext | "spatial" (0, r, c + w) as OminiControl
    ic.condition_t0 = False  # modulate condition tokens as t = 0 (OminiControl)

    c.data = d = ml_collections.ConfigDict()
    d.source = "built"  # "built": data sets under data.dir | "procedural": synthesized by index, no build step
    d.style = "classic"  # procedural only: "classic" | "photo" (dd_jax.data.synth), or both in turn: "classic+photo"
    d.examples = 0  # procedural only: 0 = every record a fresh draw; N = the first N records, repeated
    d.dir = ""  # the --out folder of python -m dd_jax.data.build (source "built")
    d.tasks = "xray"  # a subtask, a list, or "all"
    d.height = 512
    d.width = 512
    d.batch_size = 1  # global batch (a multiple of data.shards and of mesh data x fsdp)
    d.shards = 0  # Grain shards the global batch is read from, a multiple of the process count (0 = one per
    #              process); fix it to keep the data order when a run resumes on another number of processes
    d.worker_count = 0
    d.seed = 0
    d.crop = "resize"  # "native": train on windows of larger records at their own pixels (pipeline.CROPS)

    c.train = t = ml_collections.ConfigDict()
    t.steps = 30_000
    t.max_minutes = 0.0  # wall-clock budget from the process's start (0 = none): the run stops in time to save a
    #                      checkpoint and export; the same command resumes it
    t.learning_rate = 1e-4
    t.warmup_steps = 100
    t.decay = False  # cosine decay to 10% over the run
    t.weight_decay = 0.0
    t.clip_norm = 1.0
    t.t_sampling = "logit_normal"  # "uniform" | "logit_normal"
    t.t_shift = True  # Flux's resolution shift of training times
    t.prediction = "velocity"  # what the network outputs: "velocity" (Flux) | "x0" (clean layer; from-scratch pixels)
    t.loss = "velocity"  # "velocity" (flow matching) | "x0" (the same weighted by t^2: clean-layer error)
    t.residual = ()  # x0 only: targets read as an offset from the composite, x0 = z + out (e.g. ("y",))
    t.init_from = ""  # a trained model folder or run to start from (parameters only; fresh optimizer and schedule)
    t.guidance = 1.0  # guidance-embedding input for guidance-distilled bases (flux-dev)
    t.seed = 0
    t.log_every = 50
    t.checkpoint_every = 1000
    t.keep_checkpoints = 3
    t.preview_every = 1000
    t.sync_every = 10  # steps between the processes' agreement on stopping (a signal, stop_after): one host sync
    t.gpu_memory_fraction = 0.0  # JAX's GPU memory pool (XLA_PYTHON_CLIENT_MEM_FRACTION, set by dd_jax.train before
    #                              JAX starts unless the environment sets it); 0 = JAX's default, 0.75

    # Device mesh (dd_jax.sharding.make_mesh): sizes of the data / fsdp / tensor axes over all devices of all
    # processes, -1 = the rest. Default: everything on fsdp -- the batch is split over every device as in plain
    # data parallelism, and parameters and optimizer state are sharded on their hidden dim (ZeRO-3 style), which a
    # flux-dev base (24 GB bf16) plus activations needs on most accelerators; on one device it is no sharding.
    # Small models that fit every device: data=-1, fsdp=1 (replicated, no parameter all-gathers).
    # dcn_data / dcn_fsdp: the axes' sizes across slices (multi-slice TPU) or hosts; then data/fsdp/tensor are
    # sizes within one. rules: logical-axis overrides, e.g. (("activation_length", "tensor"),).
    c.mesh = ms = ml_collections.ConfigDict()
    ms.data = 1
    ms.fsdp = -1
    ms.tensor = 1
    ms.dcn_data = 1
    ms.dcn_fsdp = 1
    ms.rules = ()

    # Multi-process runs (dd_jax.sharding.maybe_initialize_distributed, before any other JAX call). "auto":
    # initialise when a launcher says there are several processes (TPU pod, SLURM, Open MPI) or the fields / env
    # (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) name a coordinator; True / False force it.
    c.distributed = dt = ml_collections.ConfigDict()
    dt.enabled = "auto"
    dt.coordinator_address = ""  # "host:port" of process 0 ("" = environment / auto-detection)
    dt.num_processes = 0  # 0 = environment / auto-detection
    dt.process_id = -1  # -1 = environment / auto-detection
    dt.cpu_collectives = ""  # "gloo" for multi-process CPU runs

    c.sample = s = ml_collections.ConfigDict()
    s.steps = 28  # the guidance-embedding input while sampling is train.guidance (decompose --guidance overrides)
    s.prompt = ""  # T5/CLIP prompt for decomposition ("" = the task's, dd_jax.data.blend.task_prompt)
    s.tile = False  # decompose at native resolution in overlapping working-size tiles (dd_jax.inference)
    s.merge_lora = True  # fold LoRA into a float base before sampling: one matmul a projection (system.for_sampling)
    return c
