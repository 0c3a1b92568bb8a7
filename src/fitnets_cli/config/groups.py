"""The typed schemas of the config groups (networks, datasets, data, recipes, hints, schedules), which the
commands' root schemas (config/commands.py) share. Hydra merges the YAML in conf/ into them, so an unknown key or a
wrong type fails at composition; `__post_init__` checks (run by `commands.to_config`) catch bad values."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from fitnets_cli.config.errors import one_of, require


@dataclass
class Layer:
    name: str = MISSING
    kind: str = "conv"          # conv | fc | softmax
    out: int = 0                # channels (conv) or units (fc) after maxout; softmax: the dataset's classes
    pieces: int = 1             # maxout pieces; 1 is a plain linear unit
    kernel: int = 3
    pad: int = 0
    pool: int = 0               # max-pool window after the maxout; 0: none
    pool_stride: int = 0        # 0: same as the window
    max_norm: float = 0.0       # max L2 norm of each filter/column after every update; 0: none

    def __post_init__(self):
        one_of(self.kind, ("conv", "fc", "softmax"), f"layer {self.name}: kind")
        require(self.kind == "softmax" or self.out > 0, f"layer {self.name}: out must be > 0")
        require(self.pieces >= 1 and self.kernel >= 1 and self.pad >= 0 and self.pool >= 0,
                 f"layer {self.name}: pieces and kernel must be >= 1, pad and pool >= 0")


@dataclass
class TeacherVariant:
    hint: str = MISSING
    layers: List[Layer] = MISSING


SOURCES = {"maxout": "layers", "torchvision": "arch", "zoo": "arch", "timm": "arch", "module": "_target_"}   # -> its key


@dataclass
class Network:
    """Where a teacher or student comes from: `layers` (the paper's maxout networks, as data), `arch` (a
    torchvision.models builder; with source=zoo a network of the CIFAR-100 benchmark's zoo; with source=timm any
    timm.create_model name) or `_target_` (any nn.Module class or factory)."""
    name: Optional[str] = None          # None: the arch or _target_
    source: Optional[str] = None        # maxout | torchvision | zoo | timm | module; None: from the key set
    layers: List[Layer] = field(default_factory=list)
    arch: Optional[str] = None          # torchvision.models.<arch>(num_classes=..., weights=None, **kwargs), zoo.<arch>
    _target_: Optional[str] = None      # dotted path, called with kwargs (and num_classes if it takes it)
    kwargs: Dict[str, Any] = field(default_factory=dict)   # +teacher.KEY=VALUE lands here too
    weights: Optional[str] = None       # a state_dict file loaded after building; torchvision: or a weight name
    pretrained: bool = False            # the model's default weights (timm: Hugging Face cache; torchvision: torch hub)

    def __post_init__(self):
        given = [k for k in ("layers", "arch", "_target_") if getattr(self, k)]
        require(len(given) == 1, f"a network sets {' and '.join(given) or 'none'} of layers (the paper's maxout "
                 "nets), arch (torchvision or zoo) and _target_ (your nn.Module); set exactly one, e.g. "
                 "teacher=torchvision teacher.arch=resnet18 or teacher=module teacher._target_=pkg.Net")
        self.source = self.source or next(s for s, k in SOURCES.items() if k == given[0])
        one_of(self.source, SOURCES, "source")
        require(SOURCES[self.source] == given[0], f"a {self.source} network is given by {SOURCES[self.source]}, "
                 f"not {given[0]}")
        self.name = self.name or self.arch or self._target_
        require(not (self.layers and self.kwargs), f"network {self.name!r}: keyword arguments "
                 f"{sorted(self.kwargs)} apply to arch or _target_ networks, not to maxout layers")
        require(not self.pretrained or self.source in ("timm", "torchvision"), f"network {self.name!r}: "
                "pretrained=true takes a timm or torchvision model's default weights; give other networks weights=PATH")


@dataclass
class Teacher(Network):
    hint: Optional[str] = None          # the default hint tap; None: the network's hint point, else hints.default_tap's rule
    checkpoint: Optional[str] = None    # None: the teacher store's entry for this teacher and dataset
    auto_train: bool = False            # train: with no checkpoint, train the teacher first (in <run>/teacher)
    variants: Dict[str, TeacherVariant] = field(default_factory=dict)


@dataclass
class Student(Network):
    guided: Optional[str] = None        # the default guided tap; None: the network's hint point, else hints.default_tap's rule


@dataclass
class Augment:
    pad: int = 0                        # zero padding before a random crop back to the input size
    flip: bool = False                  # random horizontal flips
    resized_crop: bool = False          # image files: a random-resized crop (images.crop_scale) of each file

    def __post_init__(self):
        require(self.pad >= 0, "dataset.augment.pad must be >= 0")

    @property
    def random(self) -> bool:
        """Whether each step sees another view of an image (and so a teacher's outputs cannot be reused)."""
        return bool(self.pad or self.flip or self.resized_crop)


@dataclass
class Images:
    """How a dataset of image files (dataset=imagefolder, imagenet, torchvision) becomes the networks' input."""
    reader: str = "folder"              # folder: data.root/train/<class>/* | imagenet | torchvision (cls)
    cls: Optional[str] = None           # reader torchvision: the torchvision.datasets class, e.g. FashionMNIST
    kwargs: Dict[str, Any] = field(default_factory=dict)   # its keyword arguments besides root and download
    size: Optional[int] = None          # the side of the square inputs; None: the training images' own size
    resize: Optional[int] = None        # evaluation: shorter side resized to this, centre crop of size; None: size
    channels: Optional[int] = None      # None: the images' own (they must agree); 1 or 3: every image converted
    mean: List[float] = field(default_factory=list)   # per channel, on [0, 1] pixels; []: none
    std: List[float] = field(default_factory=list)
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])   # random-resized crop: area range
    crop_ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])   # ... and aspect-ratio range

    def __post_init__(self):
        one_of(self.reader, ("folder", "imagenet", "torchvision"), "dataset.images.reader")
        require(self.reader != "torchvision" or bool(self.cls),
                 "dataset.images.reader=torchvision needs dataset.images.cls (a torchvision.datasets class name)")
        require(self.channels in (None, 1, 3), f"dataset.images.channels must be 1, 3 or null, got {self.channels}")
        require(all(v is None or v > 0 for v in (self.size, self.resize)), "dataset.images.size and resize must be > 0")
        require(len(self.mean) == len(self.std) and all(v > 0 for v in self.std),
                 "dataset.images.mean and std need one value per channel each, std > 0")
        require(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
                 "dataset.images.crop_scale must be [low, high] with 0 < low <= high <= 1")


@dataclass
class Dataset:
    name: str = MISSING                 # mnist | mnist_subset | cifar10 | cifar100 | svhn, or any for image files
    family: str = MISSING               # picks the teacher variant: mnist | cifar | svhn
    num_classes: Optional[int] = None   # None (image files): from the data
    in_shape: Optional[List[int]] = None   # C, H, W; None (image files): from the data
    # Tensor datasets: every batch resized on the device, bilinear, to this side (in_shape becomes C, resize,
    # resize; augment.pad pads the resized images); None: the images' own size. Image files: dataset.images.size.
    resize: Optional[int] = None
    # Training images held out for validation; image files also take a fraction of them (0 < valid_size < 1).
    valid_size: Any = MISSING
    preprocess: str = "scale"           # scale | gcn_zca | gcn_lcn
    gcn_scale: float = 55.0
    zca_bias: float = 0.1
    normalize: bool = False             # then subtract each channel's mean, divide by its std (training images)
    extra: bool = False                 # SVHN: train on train + extra
    students: List[str] = field(default_factory=list)   # the paper's students on this dataset (compare's default)
    augment: Augment = field(default_factory=Augment)
    images: Optional[Images] = None     # set: the dataset is read from image files (conf/dataset/imagefolder.yaml)

    def __post_init__(self):
        one_of(self.preprocess, ("scale", "gcn_zca", "gcn_lcn"), "dataset.preprocess")
        fraction = isinstance(self.valid_size, float) and 0 < self.valid_size < 1 and self.images is not None
        require(fraction or (isinstance(self.valid_size, int) and self.valid_size >= 0),
                 f"dataset.valid_size={self.valid_size} must be a count >= 0 (or, for image files, a fraction < 1)")
        require(self.images is not None or (self.in_shape is not None and self.num_classes is not None),
                 f"dataset {self.name}: in_shape and num_classes are needed unless it is read from image files")
        require(self.images is None or not self.normalize,
                 "dataset.normalize applies to mnist, cifar and svhn; image files take dataset.images.mean/std")
        require(self.images is None or self.preprocess == "scale",
                 "dataset.preprocess applies to mnist, cifar and svhn; image files take dataset.images.mean/std")
        require(not self.augment.resized_crop or self.images is not None,
                 "dataset.augment.resized_crop applies to image files; use augment.pad for tensor datasets")
        require(self.resize is None or self.images is None,
                 "dataset.resize applies to mnist, cifar and svhn tensors; size image files with dataset.images.size")
        require(self.resize is None or self.resize > 0, f"dataset.resize must be > 0 (or null), got {self.resize}")
        if self.resize is not None and self.in_shape is not None:   # idempotent: a saved config is read again
            self.in_shape = [self.in_shape[0], self.resize, self.resize]


@dataclass
class Data:
    root: str = "data"                  # where torchvision finds (or downloads) the datasets
    download: bool = False
    split_seed: int = 0                 # seeds the train/valid split, independent of the run's seed
    cache: Optional[str] = None         # preprocessed-data cache (GCN/ZCA, LCN); None: <root>/fitnets_cache
    # stratified: a seeded split with valid_size / classes images of each class held out. last: the last
    # valid_size training images, as the authors' yamls (MNIST start 50000 / stop 60000).
    valid_split: str = "stratified"
    # Image files: true holds the decoded dataset on the device (today's path for mnist, cifar, svhn); false
    # streams it through loader workers; auto holds it when it fits in resident_gb and needs no resized crops.
    resident: str = "auto"
    resident_gb: float = 2.0
    workers: int = 4                    # loader worker processes (per rank) that decode and crop
    prefetch: int = 4                   # batches each worker prepares ahead
    bad_images: str = "stop"            # an image that fails to decode mid-run: stop (naming it) | skip (counted)

    def __post_init__(self):
        one_of(self.valid_split, ("stratified", "last"), "data.valid_split")
        one_of(str(self.resident).lower(), ("auto", "true", "false"), "data.resident")
        self.resident = str(self.resident).lower()
        one_of(self.bad_images, ("stop", "skip"), "data.bad_images")
        require(self.workers >= 0 and self.prefetch >= 1, "data.workers must be >= 0 and data.prefetch >= 1")


@dataclass
class Optim:
    optimizer: str = "rmsprop"          # rmsprop | sgd | adamw (decoupled weight decay, as timm trains ViTs)
    lr: float = MISSING
    conv_lr_scale: float = 1.0          # LR multiplier of conv layers
    rms_decay: float = 0.9
    rms_eps: float = 1e-5
    momentum: float = 0.0               # SGD: momentum at epoch 0 (all along when momentum_final is 0) ...
    momentum_final: float = 0.0         # ... moving linearly to this by momentum_saturate
    momentum_saturate: int = 0
    lr_decay_factor: float = 1.0        # LR falls linearly to lr * factor by lr_decay_saturate
    lr_decay_saturate: int = 0
    lr_exp_decay: float = 1.0           # divide the LR by this after every update (pylearn2 ExponentialDecay)
    lr_min: float = 0.0                 # ... but never below this
    lr_cosine: bool = False             # cosine from the LR to lr_min over max_epochs, by epoch (timm's recipes)
    warmup_epochs: int = 0              # the first epochs ramp linearly up to the LR
    lr_steps: List[int] = field(default_factory=list)   # from each of these (0-based) epochs on, LR x lr_step_factor
    lr_step_factor: float = 0.1
    lr_batch: int = 0                   # lr is for batches of this many images: scaled by batch_size / lr_batch
    weight_decay: float = 0.0           # L2 penalty on every trained parameter (the optimiser's weight_decay)
    batch_size: int = 128
    drop_last: bool = False             # skip each epoch's last partial batch (pylearn2's even_* iterators)
    max_epochs: int = 500
    patience: int = 100                 # stop after this many epochs without a validation improvement
    init_range: float = 0.005           # weights ~ U(-r, r), biases 0
    dropout_input: float = 0.0
    dropout: float = 0.0
    augment: Optional[Augment] = None   # None: the dataset's augmentation

    def __post_init__(self):
        one_of(self.optimizer, ("rmsprop", "sgd", "adamw"), "optimizer")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        require(self.max_epochs > 0, f"max_epochs must be > 0, got {self.max_epochs}")
        require(self.patience > 0, f"patience must be > 0, got {self.patience}")
        require(self.lr_exp_decay >= 1, f"lr_exp_decay must be >= 1 (1: off), got {self.lr_exp_decay}")
        require(self.lr_batch >= 0 and self.weight_decay >= 0, "lr_batch and weight_decay must be >= 0 (0: off)")
        require(0 < self.lr_step_factor <= 1 and all(e > 0 for e in self.lr_steps),
                 "lr_step_factor must be in (0, 1] and lr_steps epochs > 0")
        # Settings that would otherwise be accepted and have no effect:
        require(self.optimizer == "sgd" or self.momentum == self.momentum_final == 0,
                 "momentum / momentum_final apply to optimizer=sgd only; set them to 0 with rmsprop or adamw")
        require(not self.lr_cosine or (self.lr_decay_factor == 1 and not self.lr_steps),
                 "lr_cosine replaces lr_decay_factor and lr_steps; use one LR schedule")
        require(self.warmup_epochs >= 0, "warmup_epochs must be >= 0")
        require(self.lr_decay_factor == 1 or self.lr_decay_saturate > 0,
                 "lr_decay_factor needs lr_decay_saturate > 0 (the epoch at which the decay ends)")
        require(self.momentum_final == 0 or self.momentum_saturate > 0,
                 "momentum_final needs momentum_saturate > 0 (the epoch at which it is reached)")


@dataclass
class KD:
    form: str = "paper"                 # paper: CE + lam * soft CE; hinton: ce_weight * CE + lam * tau^2 * KL
    ce_weight: float = 1.0              # the weight of the hard-label cross-entropy
    tau: float = 3.0
    lam_start: float = 4.0
    lam_end: float = 1.0
    lam_start_epoch: int = 0            # lam is lam_start up to this (0-based) stage-2 epoch ...
    lam_end_epoch: int = 499            # ... and reaches lam_end at this one, linearly

    def __post_init__(self):
        one_of(self.form, ("paper", "hinton"), "recipe.kd.form")
        require(self.tau > 0, f"recipe.kd.tau must be > 0, got {self.tau}")
        require(self.lam_end_epoch >= self.lam_start_epoch >= 0,
                 "recipe.kd needs 0 <= lam_start_epoch <= lam_end_epoch")


@dataclass
class Recipe:
    student: Optim = MISSING
    teacher: Optim = MISSING
    kd: KD = field(default_factory=KD)
    retrain_full: bool = False          # after validation picks epoch counts, retrain on train + valid
    hint_epochs: Optional[int] = None   # each hint stage's epochs; None: recipe.student.max_epochs
    # Networks that this recipe trains at another LR (network name -> LR, replacing recipe.student.lr or
    # recipe.teacher.lr for them): the CRD benchmark's 0.01 for MobileNetV2 and the ShuffleNets.
    lr_by_network: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        require(self.hint_epochs is None or self.hint_epochs > 0, "recipe.hint_epochs must be > 0 (or null)")


@dataclass
class HintPair:
    hint: Optional[str] = None          # teacher tap; None: the teacher's default
    guided: Optional[str] = None        # student tap; None: the student's default


@dataclass
class Hints:
    pairs: List[HintPair] = MISSING
    reduction: str = "code"             # code | paper | mse (see conf/hints/paper.yaml)
    regressor: str = "paper"            # paper | conv_bn | 1x1 | auto (see conf/hints/paper.yaml)
    regressor_init_range: float = 0.05  # paper regressor only: U(-r, r) init ...
    regressor_max_norm: float = 0.9     # ... and max kernel norm (0: none)

    def __post_init__(self):
        one_of(self.reduction, ("code", "paper", "mse"), "hints.reduction")
        one_of(self.regressor, ("paper", "conv_bn", "1x1", "auto"), "hints.regressor")


# The built-in loss terms (training/terms.py's TERMS, which a test keeps equal to this).
TERMS = ("ce", "kd", "hint", "at", "sp", "pkt", "dkd")


@dataclass
class TermSpec:
    """One weighted term of a stage's loss: a built-in (`term`) or your own (`_target_`, a dotted path to a
    function or an nn.Module class; docs/methods.md gives the signature)."""
    term: Optional[str] = None          # ce | kd | hint | at | sp | pkt | dkd
    _target_: Optional[str] = None
    name: Optional[str] = None          # in logs (train_<name>); None: the term, or the callable's name
    # None: 1, except kd's, the paper's lam (recipe.kd's lam_start to lam_end over its epochs), and hint's,
    # schedule.hint_weight
    weight: Optional[float] = None
    weight_end: Optional[float] = None  # set: the weight moves linearly from weight to weight_end ...
    ramp: List[int] = field(default_factory=lambda: [0, 0])   # ... between these (0-based) epochs of the stage
    # The taps it reads, by name (`fitnets layers`); logits: the network's output. None: the term's default
    # (ce, kd, dkd: the logits; the others, and yours: the hint pairs, guided taps and hint taps).
    student: Optional[List[str]] = None
    teacher: Optional[List[str]] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)   # its settings (tau, p, ...); kd: recipe.kd's by default

    def __post_init__(self):
        require((self.term is None) != (self._target_ is None), "a loss term sets one of term (a built-in: "
                f"{', '.join(TERMS)}) and _target_ (a dotted path to your own), got "
                f"{'both' if self.term else 'neither'}")
        if self.term is not None:
            one_of(self.term, TERMS, "term")
        self.name = self.name or self.term or self._target_.rsplit(".", 1)[-1]
        require(all(w is None or w >= 0 for w in (self.weight, self.weight_end)),
                f"term {self.name}: weights must be >= 0 (got {self.weight}, {self.weight_end}); drop the term to "
                "turn it off")
        require(self.weight_end is None or self.weight is not None, f"term {self.name}: weight_end needs weight")
        require(len(self.ramp) == 2 and 0 <= self.ramp[0] <= self.ramp[1],
                f"term {self.name}: ramp must be [first, last] epochs with 0 <= first <= last, got {self.ramp}")


@dataclass
class StageSpec:
    """One stage of a schedule: what it trains and its loss, a weighted sum of terms."""
    name: Optional[str] = None          # None: its terms, joined by +
    # student: all of it. guided: the student up to the taps its terms read (the paper's stage 1), plus
    # their regressors; validated on its loss, not on error. modules: the student's modules named in modules.
    train: str = "student"
    modules: List[str] = field(default_factory=list)   # train=modules: module-name prefixes (`fitnets layers`)
    per_pair: bool = False              # one stage per hint pair, shallowest guided tap first (Algorithm 1)
    terms: List[TermSpec] = MISSING

    def __post_init__(self):
        self.name = self.name or "+".join(t.name for t in self.terms)
        one_of(self.train, ("student", "guided", "modules"), f"stage {self.name}: train")
        require(bool(self.modules) == (self.train == "modules"), f"stage {self.name}: train=modules takes "
                "modules=[prefix, ...] (and modules goes with train=modules only)")
        require(bool(self.terms), f"stage {self.name}: terms is empty; give at least one loss term")
        names = [t.name for t in self.terms]
        require(len(set(names)) == len(names), f"stage {self.name}: two terms are named {', '.join(names)}; "
                "give each a name")


@dataclass
class Schedule:
    name: str = MISSING                 # the method's name, which compare groups runs by
    stages: List[StageSpec] = MISSING   # run in order (conf/schedule/ has the presets)
    hint_weight: float = 1.0            # the weight of the hint terms that set none

    def __post_init__(self):
        require(bool(self.stages), f"schedule {self.name}: stages is empty")
        require(self.hint_weight >= 0, f"schedule.hint_weight must be >= 0, got {self.hint_weight}")


@dataclass
class Speed:
    enabled: bool = True
    batch_size: int = 64
    warmup: int = 2
    repeats: int = 5                    # the median of these timed forward passes is reported

    def __post_init__(self):
        require(self.batch_size > 0 and self.repeats > 0 and self.warmup >= 0,
                 "speed.batch_size and speed.repeats must be > 0, speed.warmup >= 0")
