"""`napari-selfreg train | predict | evaluate | inspect | bench | demo`.

User errors (bad files, shapes, nothing painted...) print one line and exit with code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

EXIT_USER_ERROR = 2
DEFAULT_WIDTH, DEFAULT_DEPTH = 16, 4  # ModelConfig's defaults (kept here: the parser imports no torch)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .core.checkpoint import ModelFileError
    from .core.data import InputError
    from .io import ImageFileError

    # files the user named that cannot be read or written: one line, not a traceback
    return (InputError, ModelFileError, ImageFileError, FileNotFoundError, PermissionError,
            IsADirectoryError, NotADirectoryError, FileExistsError)


def check_output(path: Path, what: str, suffixes: tuple[str, ...] | None = None, folder: bool = False) -> None:
    """Refuse, before any work, an output the command could not write at the end."""
    import os

    from .core.data import InputError
    from .io import suffix_of

    path = Path(path)
    if path.is_dir() and not folder:
        raise InputError(f"{what} {path} is a folder; give a file name")
    if path.exists() and folder and not path.is_dir():
        raise InputError(f"{what} {path} is a file; give a folder")
    if suffixes is not None and suffix_of(path) not in suffixes:
        raise InputError(f"{what} {path.name}: cannot write this format; use one of {', '.join(suffixes)}")
    existing = path.resolve()
    while not existing.exists():
        existing = existing.parent
    if existing != path.resolve() and not existing.is_dir():
        raise InputError(f"cannot write {what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise InputError(f"cannot write {what} {path}: no permission to write in {existing}")


def _progress(total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=None)


# ------------------------------------------------------------------------------------ train


def _stop_on_first_interrupt(stop: threading.Event):
    """Ctrl-C asks training to stop after the current step (weights are saved); twice aborts."""

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after this step (Ctrl-C again to abort without saving)", file=sys.stderr)

    return handler


def cmd_train(args: argparse.Namespace) -> int:
    from .core.checkpoint import load_model, model_path
    from .core.config import ModelConfig, TrainConfig
    from .core.data import InputError, check_painted, painted_ids
    from .core.train import train
    from .io import check_planar, open_image, read_image

    if len(args.image) != len(args.labels):
        raise InputError(f"{len(args.image)} --image but {len(args.labels)} --labels; give one --labels per --image")
    if args.seed < 0:
        raise InputError("--seed must be 0 or more")
    if args.time_budget is not None and not 0 < args.time_budget < math.inf:
        raise InputError("--time-budget must be a positive number of seconds")
    if args.resume and (args.width != DEFAULT_WIDTH or args.depth != DEFAULT_DEPTH):
        raise InputError("--width and --depth come from the model when training continues (--resume); leave them out")
    check_model_name(args.out)
    check_output(model_path(args.out), "--out")
    for p in [*args.image, *args.labels]:
        check_planar(p)
    for p in args.labels:
        if Path(p).suffix.lower() in (".jpg", ".jpeg"):
            raise InputError(f"{Path(p).name}: JPEG changes label ids as it compresses; save the labels as PNG or TIFF")
    images = [open_image(p) for p in args.image]  # slides lazily: training reads the windows around the paint
    labels = [one_channel_labels(read_image(p, labels=True), p) for p in args.labels]
    steps = args.steps if args.steps is not None else (10**9 if args.time_budget is not None else TrainConfig.steps)
    config = TrainConfig(
        steps=steps,
        time_budget=args.time_budget,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        selfreg=not args.no_selfreg,
        lambda_scr=args.lambda_scr,
        lambda_ifd=args.lambda_ifd,
        keep=args.keep,
        device=args.device,
        precision=args.precision,
        validation_every=args.validate_every,
        seed=args.seed,
    )
    initial = load_model(args.resume) if args.resume else None
    model_config = ModelConfig(base_channels=args.width, depth=args.depth)
    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    if names is not None and (len(names) < 2 or not all(names)):
        raise InputError("--class-names needs a name for background and each structure, e.g. background,nuclei")
    if names is not None:
        classes = check_painted(labels, initial.config.num_classes if initial else None)
        if len(names) > classes:
            raise InputError(
                f"--class-names gives {len(names)} names but there are {classes} classes "
                f"(labels 1..{classes}); give one name per class"
            )
    painted = painted_ids(labels)
    gaps = [i for i in range(2, max(painted, default=0)) if i not in painted]
    stop = threading.Event()
    run = train(images, labels, config, model_config, class_names=names, initial=initial, stop=stop)
    total = steps if args.steps is not None or not args.time_budget else int(args.time_budget)
    bar = _progress(total, "training", "step" if args.steps is not None or not args.time_budget else "s")
    result = None
    previous_handler = signal.signal(signal.SIGINT, _stop_on_first_interrupt(stop))
    try:
        while True:
            report = next(run)
            if gaps:  # the inputs passed every check: warn once, above the bar
                gaps, missing = [], gaps
                bar.write(f"napari-selfreg train: warning: label {', '.join(map(str, missing))} is not painted, so "
                          "this training does not teach that class", file=sys.stderr)
            if args.time_budget and args.steps is None:
                bar.n = min(int(report.elapsed), total)
                bar.refresh()
            else:
                bar.update(1)
            postfix = {"loss": f"{report.loss:.3f}"}
            if report.val_dice is not None:
                postfix["val_dice"] = f"{report.val_dice:.3f}"
            bar.set_postfix(postfix, refresh=False)
    except StopIteration as done:
        result = done.value
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
    if result.stopped:
        print("stopped: saving the weights trained so far", file=sys.stderr)
    path = save_or_rescue(result.model, args.out)
    last = result.history[-1] if result.history else None
    summary = {
        "model": str(path),
        "steps": result.steps,
        "seconds": round(last.elapsed, 2) if last else 0.0,
        "final_loss": round(last.loss, 4) if last else None,
        "best_val_dice": last.best_val_dice if last else None,
        "kept": args.keep,
        "stopped": result.stopped,
    }
    print(json.dumps(summary))
    return 0


def one_channel_labels(labels, path):
    """Labels saved as an RGB(A) picture of gray ids are their first channel; colours are refused."""
    import numpy as np

    from .core.data import InputError

    if labels.ndim == 3 and labels.shape[-1] in (3, 4):
        ids = labels[..., 0]
        if not all(np.array_equal(ids, labels[..., c]) for c in (1, 2)):
            raise InputError(
                f"{Path(path).name} is a colour picture, not labels; save the label ids as one channel "
                "(0 = not painted, 1 = background, 2.. = structures), e.g. from napari's Labels layer"
            )
        return ids
    return labels


def save_or_rescue(model, out: Path) -> Path:
    """Save the trained model; if ``out`` cannot be written after all (a full disk, a permission
    the early check could not see), save it under the working or temporary folder and say where."""
    import tempfile
    import time

    from safetensors import SafetensorError

    from .core.checkpoint import model_path, save_model
    from .core.data import InputError

    try:
        return save_model(model, out)
    except (OSError, SafetensorError) as error:
        problem = getattr(error, "strerror", None) or error
    name = f"{model_path(out).stem}-rescued-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        try:
            rescued = save_model(model, folder / name)
        except (OSError, SafetensorError):
            continue
        raise InputError(f"could not write {model_path(out)} ({problem}); the trained model is saved as {rescued}")
    raise InputError(f"could not write {model_path(out)} ({problem}), nor a copy in the working or temporary folder")


# ---------------------------------------------------------------------------------- predict


def check_distinct(inputs: dict[str, Path], outputs: dict[str, Path | None]) -> None:
    """Refuse a command whose output would overwrite one of its inputs or another output."""
    from .core.data import InputError

    seen = {Path(path).resolve(): option for option, path in inputs.items()}
    for option, path in outputs.items():
        if path is None:
            continue
        key = Path(path).resolve()
        if key in seen:
            raise InputError(f"{option} and {seen[key]} name the same file {path}; give {option} its own file")
        seen[key] = option


def label_counts(labels, ids: list[int], rows: int = 512) -> dict[str, int]:
    """Pixels per label id, a band of rows at a time (a slide's labels may be a memory map)."""
    import numpy as np

    counts = np.zeros(max(ids) + 1, np.int64)
    for top in range(0, labels.shape[0], rows):
        band = np.asarray(labels[top : top + rows])
        counts += np.bincount(band.ravel(), minlength=counts.size)[: counts.size]
    return {str(i): int(counts[i]) for i in ids}


STEM = "{stem}"


def image_stem(path: Path) -> str:
    """The file name without its image suffix (``a.nii.gz`` and ``a.ome.tif`` -> ``a``)."""
    from .io import suffix_of

    name = Path(path).name
    suffix = suffix_of(path)
    stem = name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else Path(name).stem
    return stem[:-4] if suffix in (".tif", ".tiff") and stem.lower().endswith(".ome") else stem


def check_model_name(out: Path) -> None:
    """``train --out labels.tif`` (predict's --out is a labels file) would write labels.tif.safetensors."""
    from .core.data import InputError
    from .io import ITK_SUFFIXES, PIL_SUFFIXES, TIFF_SUFFIXES, suffix_of

    suffix = suffix_of(out)
    if suffix in (*TIFF_SUFFIXES, *PIL_SUFFIXES, *ITK_SUFFIXES):
        stem = Path(out).name[: -len(suffix)] or "model"
        raise InputError(f"--out {Path(out).name} names an image file, but train writes a model: "
                         f"name it e.g. {stem}.safetensors")


def check_pixel_size(side: float | None) -> None:
    """--pixel-size, where given, is a side in micrometres: finite and above 0."""
    from .core.data import InputError

    if side is not None and not (math.isfinite(side) and side > 0):
        raise InputError(f"--pixel-size must be the side of a pixel in micrometres (e.g. 0.25), not {side}")


def check_stems(inputs: list[Path], command: str) -> None:
    """Refuse inputs whose {stem} outputs would overwrite each other."""
    from .core.data import InputError

    stems: dict[str, Path] = {}
    for path in inputs:
        # letter case too: the folders of macOS and Windows take A_labels.tif for a_labels.tif
        key = image_stem(path).casefold()
        if key in stems:
            same = image_stem(stems[key]) == image_stem(path)
            how = f"share the name {image_stem(path)}" if same else "have names that differ only in letter case"
            raise InputError(f"{stems[key]} and {path} {how}, so their outputs would overwrite each other; "
                             f"{command} them in separate runs")
        stems[key] = path


def output_for(template: Path | None, image: Path, option: str, several: bool) -> Path | None:
    """An output path of one image: ``{stem}`` in the template becomes the image's stem."""
    from .core.data import InputError

    if template is None:
        return None
    if STEM not in str(template):
        if several:
            raise InputError(f"{option} must hold {STEM} when predicting several images (e.g. out/{STEM}.tif)")
        return Path(template)
    return Path(str(template).replace(STEM, image_stem(image)))


@dataclass
class PredictJob:
    """One image of a ``predict`` run and where its results go."""

    image: Path
    out: Path
    probabilities: Path | None
    instances: Path | None
    uncertainty: Path | None = None
    measurements: Path | None = None
    pixel_size: float | None = None  # micrometres, for the measurements

    def outputs(self) -> dict[str, Path | None]:
        return {"--out": self.out, "--probabilities": self.probabilities, "--instances": self.instances,
                "--uncertainty": self.uncertainty, "--measurements": self.measurements}


def predict_jobs(args: argparse.Namespace) -> list[PredictJob]:
    """Every image's outputs, refused before any work when one would overwrite an input or
    another output, or could not be written."""
    from .core.data import InputError
    from .io import FLOAT_SUFFIXES, INSTANCE_SUFFIXES, LABEL_SUFFIXES, check_planar

    images = [Path(p) for p in args.image]
    several = len(images) > 1
    if args.measurements is not None and args.instances is None:
        raise InputError("--measurements measures the objects of --instances; add --instances INSTANCES.tif")
    if args.pixel_size is not None and args.measurements is None:
        raise InputError("--pixel-size sizes the objects of --measurements; add --measurements OBJECTS.csv")
    check_pixel_size(args.pixel_size)
    if len({image.resolve() for image in images}) < len(images):
        raise InputError("an --image is given twice; name each image once")
    named = f"{args.out}{args.probabilities}{args.instances}{args.uncertainty}{args.measurements}"
    if STEM in named:
        check_stems(images, "predict")
    jobs = [
        PredictJob(image, *(output_for(t, image, o, several) for t, o in (
            (args.out, "--out"), (args.probabilities, "--probabilities"), (args.instances, "--instances"),
            (args.uncertainty, "--uncertainty"), (args.measurements, "--measurements"))), args.pixel_size)
        for image in images
    ]
    inputs = {"--model": args.model} | {_of("--image", job, several): job.image for job in jobs}
    outputs = {_of(option, job, several): path for job in jobs for option, path in job.outputs().items()}
    check_distinct(inputs, outputs)
    for job in jobs:
        check_output(job.out, _of("--out", job, several), LABEL_SUFFIXES)
        if job.probabilities is not None:
            check_output(job.probabilities, _of("--probabilities", job, several), FLOAT_SUFFIXES)
        if job.instances is not None:
            check_output(job.instances, _of("--instances", job, several), INSTANCE_SUFFIXES)
        if job.uncertainty is not None:
            check_output(job.uncertainty, _of("--uncertainty", job, several), FLOAT_SUFFIXES)
        if job.measurements is not None:
            check_output(job.measurements, _of("--measurements", job, several), (".csv",))
        if not job.image.exists():
            raise FileNotFoundError(f"--image {job.image} does not exist")
        check_planar(job.image)
    return jobs


def _of(option: str, job: PredictJob, several: bool) -> str:
    return f"{option} of {job.image}" if several else option


def cmd_predict(args: argparse.Namespace) -> int:
    """One image, or several with ``{stem}`` in the output names: the model is loaded once,
    and an image that fails is reported and skipped (exit code 2 at the end)."""
    from .core.checkpoint import load_model
    from .core.config import PredictConfig

    jobs = predict_jobs(args)
    model = load_model(args.model)
    config = PredictConfig(
        tile_size=args.tile_size, overlap=args.overlap, device=args.device, precision=args.precision, flips=args.flips
    )
    if len(jobs) == 1:
        print(json.dumps(predict_one(model, jobs[0], config)))
        return 0
    return run_each("predict", [(job.image, job) for job in jobs], "images",
                     lambda number, job: predict_one(model, job, config, f"{job.image.name} ({number}/{len(jobs)})"))


def run_each(command: str, jobs: list[tuple[Path, object]], noun: str, one) -> int:
    """Run ``one(number, job)`` for each (input, job), printing one JSON line each; a job that
    fails with a user error is reported with its input and skipped (exit code 2 at the end)."""
    failed = 0
    for number, (source, job) in enumerate(jobs, 1):
        try:
            summary = one(number, job)
        except _user_errors() as error:
            failed += 1
            print(f"napari-selfreg {command}: error: {source}: {error}", file=sys.stderr)
            continue
        print(json.dumps(summary), flush=True)
    if failed:
        print(f"napari-selfreg {command}: {failed} of {len(jobs)} {noun} failed (see above)", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def predict_one(model, job: PredictJob, config, desc: str = "predicting") -> dict:
    """Predict one image into its files; the JSON summary printed for it."""
    import contextlib
    import tempfile

    import numpy as np

    from .core.predict import allocate_outputs, allocate_uncertainty, plane_shape, predict_tiled
    from .io import open_image, write_image

    image = open_image(job.image)
    want_probabilities = job.probabilities is not None
    summary: dict = {"image": str(job.image), "labels": str(job.out), "classes": model.class_names}
    with contextlib.ExitStack() as cleanup:
        out_labels = out_probabilities = out_uncertainty = scratch = None
        if not isinstance(image, np.ndarray):
            # a slide opened lazily: the outputs go to memory maps beside the result, not to RAM
            folder = job.out.resolve().parent
            folder.mkdir(parents=True, exist_ok=True)
            scratch = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix=".selfreg-", dir=folder)))
            shape = plane_shape(image)
            out_labels, out_probabilities = allocate_outputs(
                shape, model.config.num_classes, scratch, probabilities=want_probabilities, kind="memmap"
            )
            if job.uncertainty is not None:
                out_uncertainty = allocate_uncertainty(shape, scratch, kind="memmap")
        run = predict_tiled(
            model, image, config, probabilities=want_probabilities,
            out_labels=out_labels, out_probabilities=out_probabilities,
            uncertainty=job.uncertainty is not None, out_uncertainty=out_uncertainty,
        )
        prediction = _with_bar(run, desc, "tile")
        write_image(job.out, prediction.labels, like=job.image, class_names=model.class_names)
        if want_probabilities:
            write_image(job.probabilities, np.asarray(prediction.probabilities, np.float32), like=job.image,
                        planes=True)
        if job.uncertainty is not None:
            write_image(job.uncertainty, prediction.uncertainty, like=job.image)
            # numpy sums a memory map through small buffers: no copy of a slide's map in RAM
            summary["mean_uncertainty"] = round(float(np.mean(prediction.uncertainty, dtype=np.float64)), 4)
        if job.instances is not None:
            split = _split_instances(prediction.labels, scratch)
            write_image(job.instances, split.instances, like=job.image, class_names=[])  # reopens as labels
            summary["instances"] = split.count
            summary["instances_per_label"] = {str(c): n for c, n in split.per_class.items()}
            if job.measurements is not None:
                summary["measurements"] = _measure(split.instances, prediction.labels, image, job.measurements,
                                                   job.pixel_size, [job.image])
            if split.truncated:
                print(f"napari-selfreg predict: warning: {job.image}: {split.truncated} groups of objects are "
                      "wider than the widest window and were split only near where they start", file=sys.stderr)
            del split
        summary["pixels_per_label"] = label_counts(prediction.labels, model.info.label_ids)
        del prediction, out_labels, out_probabilities, out_uncertainty  # memory maps go before their folder
    return summary


def _with_bar(run, desc: str, unit: str):
    """Drain a progress generator (``done``/``total`` items) behind a progress bar."""
    bar = None
    try:
        while True:
            progress = next(run)
            if bar is None:
                bar = _progress(progress.total, desc, unit)
            if progress.done < bar.n:  # a second pass (the instances' fill) counts from 0 again
                bar.reset(total=progress.total)
            bar.update(progress.done - bar.n)
    except StopIteration as done:
        return done.value
    finally:
        if bar is not None:
            bar.close()


def _split_instances(labels, scratch: Path | None):
    """The instance split of a prediction, window by window; into a memory map in ``scratch``
    for a slide, as its labels are."""
    import numpy as np

    from .core.instances import split_instances

    out = None
    if scratch is not None:
        out = np.lib.format.open_memmap(scratch / "instances.npy", mode="w+", dtype=np.int32, shape=labels.shape)
    return _with_bar(split_instances(labels, out), "instances", "window")


def _measure(instances, labels, image, out: Path, side: float | None, sized_by: list[Path]) -> dict:
    """Write the objects' table (read band by band: a slide's objects stay in their memory
    map); the summary's per-class counts and sizes. The pixel size is ``side`` in micrometres
    (--pixel-size), else that of the first file of ``sized_by`` that records one (NIfTI, MHA,
    NRRD, or a TIFF that predict wrote), in its own unknown unit. The image adds each object's
    mean colour (and hematoxylin and eosin density for RGB), read band by band like the objects."""
    from .core.measurements import class_summary, image_under, measure_objects, write_csv
    from .io import pixel_size

    spacing, unit = ((side, side), "um") if side else (next(filter(None, map(pixel_size, sized_by)), None), None)
    image = None if image is None else image_under(image, instances.shape)  # e.g. a one-slice volume: no colours
    table = _with_bar(measure_objects(instances, labels, spacing, unit=unit, image=image), "measuring", "band")
    write_csv(table, out)
    summary: dict = {"file": str(out), "objects": len(table)}
    if table.spacing is not None:
        summary["pixel_size"] = list(table.spacing)
        if table.unit:
            summary["unit"] = table.unit
    summary["per_label"] = {
        str(c): {"count": s.count, "mean_area_px": round(s.mean_area, 2), "median_area_px": round(s.median_area, 2),
                 "area_fraction": round(s.area_fraction, 6),
                 **{name: round(value, 4) for name, value in (("median_circularity", s.median_circularity),
                                                              ("median_solidity", s.median_solidity))
                    if math.isfinite(value)}}
        for c, s in class_summary(table).items()
    }
    return summary


# --------------------------------------------------------------------------------- evaluate


@dataclass
class MeasureJob:
    """One objects file of a ``measure`` run, what goes with it, and where its table goes."""

    instances: Path
    labels: Path | None
    image: Path | None
    out: Path


def measure_jobs(args: argparse.Namespace) -> list[MeasureJob]:
    """Each objects file with its class map and image (paired in the order given) and its
    table, refused before any work as ``predict_jobs`` refuses."""
    from .core.data import InputError
    from .io import check_planar

    objects = [Path(p) for p in args.instances]
    several = len(objects) > 1
    paired = {}
    for option, given in (("--labels", args.labels), ("--image", args.image)):
        if given and len(given) != len(objects):
            raise InputError(f"{len(objects)} --instances files but {len(given)} {option} files; give one "
                             f"{option} per --instances, in the same order")
        paired[option] = [Path(p) for p in given] if given else [None] * len(objects)
    check_pixel_size(args.pixel_size)
    if len({path.resolve() for path in objects}) < len(objects):
        raise InputError("an --instances file is given twice; name each once")
    if STEM in str(args.out):
        check_stems(objects, "measure")
    jobs = [MeasureJob(path, labels, image, output_for(args.out, path, "--out", several))
            for path, labels, image in zip(objects, paired["--labels"], paired["--image"], strict=True)]
    def named(option: str, job: MeasureJob) -> str:
        return f"{option} of {job.instances}" if several else option

    inputs = {named(option, job): path for job in jobs
              for option, path in (("--instances", job.instances), ("--labels", job.labels), ("--image", job.image))
              if path is not None}
    check_distinct(inputs, {named("--out", job): job.out for job in jobs})
    for job in jobs:
        check_output(job.out, named("--out", job), (".csv",))
        for option, path in (("--instances", job.instances), ("--labels", job.labels), ("--image", job.image)):
            if path is not None:
                if not path.exists():
                    raise FileNotFoundError(f"{option} {path} does not exist")
                check_planar(path)
    return jobs


def cmd_measure(args: argparse.Namespace) -> int:
    """The objects of instance files (e.g. predict's, corrected in napari) measured into CSV
    tables; with several, a file that fails is reported and skipped (exit code 2 at the end)."""
    jobs = measure_jobs(args)
    if len(jobs) == 1:
        print(json.dumps(measure_one(jobs[0], args.pixel_size)))
        return 0
    return run_each("measure", [(job.instances, job) for job in jobs], "files",
                    lambda _number, job: measure_one(job, args.pixel_size))


def measure_one(job: MeasureJob, side: float | None) -> dict:
    """Read one objects file (with its class map and image) and write its table."""
    from .core.data import InputError
    from .core.measurements import image_under
    from .io import open_image, open_labels

    instances = one_channel_labels(open_labels(job.instances), job.instances)  # a slide's lazily
    labels = None
    if job.labels is not None:
        labels = one_channel_labels(open_labels(job.labels), job.labels)
        if labels.shape != instances.shape:
            raise InputError(f"--labels {job.labels.name} {tuple(labels.shape)} and --instances "
                             f"{job.instances.name} {tuple(instances.shape)} differ in shape; give the class map "
                             "the objects came from")
    image = None
    if job.image is not None:
        image = open_image(job.image)  # a slide lazily: its colours are read band by band
        if image_under(image, instances.shape) is None:
            raise InputError(f"--image {job.image.name} {tuple(image.shape)} is not the picture of --instances "
                             f"{job.instances.name} {tuple(instances.shape)}; give the image they were segmented "
                             "from")
    sized_by = [p for p in (job.instances, job.image) if p is not None]
    return {"instances": str(job.instances),
            "measurements": _measure(instances, labels, image, job.out, side, sized_by)}


def cmd_evaluate(args: argparse.Namespace) -> int:
    """One prediction against its mask; or several, paired in the order given, each scored
    and then the mean over the images per class."""
    from .core.data import InputError
    from .core.metrics import masks_kind

    if len(args.prediction) != len(args.mask):
        raise InputError(
            f"{len(args.prediction)} --prediction files but {len(args.mask)} --mask files; give one mask per prediction"
        )
    instances = args.instances or [None] * len(args.prediction)
    if len(instances) != len(args.prediction):
        raise InputError(
            f"{len(args.prediction)} --prediction files but {len(instances)} --instances files; give one instance "
            "file per prediction (as predict --instances wrote them)"
        )
    if len(args.prediction) == 1:
        pair = evaluate_pair(args.prediction[0], args.mask[0], instances=instances[0])
        print(json.dumps({key: pair[key] for key in ("classes", "objects") if key in pair}, indent=2))
        return 0
    # one reading of the masks for all pairs (ids or binary), so the mean compares like with like
    kind = masks_kind(read_mask(path) for path in args.mask)
    pairs = [evaluate_pair(p, m, kind, i) for p, m, i in zip(args.prediction, args.mask, instances, strict=True)]
    mean = {"images": len(pairs), "classes": mean_scores(pairs)}
    if args.instances:
        mean["objects"] = mean_objects(pairs)
    print(json.dumps({"masks": kind, "pairs": pairs, "mean": mean}, indent=2))
    return 0


def read_mask(path: Path):
    """A mask of one channel: gray ids saved as RGB(A) are their first channel; a colour
    picture or a stack is refused."""
    from .io import check_planar, read_image

    check_planar(path)
    return one_channel_labels(read_image(path, labels=True), path)


def evaluate_pair(prediction_path: Path, mask_path: Path, kind: str | None = None,
                  instances: Path | None = None) -> dict:
    """Dice and IoU per class; with ``instances``, the objects matched one to one too."""
    from .core.data import InputError
    from .core.metrics import MAX_PAINTING_ID, mask_kind, mask_objects, object_scores, per_class_overlap
    from .io import read_image

    prediction = read_image(prediction_path, labels=True)
    mask = read_mask(mask_path)
    if prediction.shape != mask.shape:
        raise InputError(
            f"prediction {prediction_path.name} {prediction.shape} and mask {mask_path.name} {mask.shape} "
            "differ in shape"
        )
    top = int(prediction.max()) if prediction.size else 0
    if top > MAX_PAINTING_ID and (kind or mask_kind(mask)) == "ids":
        # scored class by class, a 0/255 prediction matches nothing: every Dice would read 0
        raise InputError(
            f"prediction {prediction_path.name} holds {top}, which is no painting id, while mask "
            f"{mask_path.name} holds painting ids (1 = background, 2.. = structures); were --prediction "
            "and --mask given the other way round?"
        )
    scores = per_class_overlap(prediction, mask, kind)
    pair = {
        "prediction": str(prediction_path),
        "mask": str(mask_path),
        "classes": {k: {"dice": v.dice, "iou": v.iou} for k, v in scores.items()},
    }
    if instances is not None:
        found = read_image(instances, labels=True)
        if found.shape != mask.shape:
            raise InputError(f"instances {instances.name} {found.shape} and mask {mask_path.name} {mask.shape} "
                             "differ in shape")
        if found.size and found.min() > 0:  # instance files keep 0 for "no object"; a class map has none
            raise InputError(
                f"instances {instances.name} holds no 0 (no object), so it is a class map such as predict's labels "
                "(1 = background), not objects; give the file predict --instances wrote"
            )
        truth, read_as = mask_objects(mask)  # as the mask itself shows them, whatever the others hold
        pair["instances"] = str(instances)
        pair["objects"] = {**object_scores(found, truth).to_dict(), "true_objects_from": read_as}
    return pair


def mean_scores(pairs: list[dict]) -> dict:
    """Per class, the mean Dice and IoU over the images that report the class."""
    classes = sorted({c for pair in pairs for c in pair["classes"]}, key=int)
    means = {}
    for c in classes:
        scored = [pair["classes"][c] for pair in pairs if c in pair["classes"]]
        means[c] = {k: sum(s[k] for s in scored) / len(scored) for k in ("dice", "iou")} | {"images": len(scored)}
    return means


def mean_objects(pairs: list[dict]) -> dict:
    """Object counts summed over the images; F1, matched IoU (SQ) and PQ averaged per image."""
    scored = [pair["objects"] for pair in pairs]
    return {
        **{k: sum(s[k] for s in scored) for k in ("predicted", "true", "matched")},
        **{k: sum(s[k] for s in scored) / len(scored) for k in ("f1", "mean_matched_iou", "panoptic_quality")},
    }


# ---------------------------------------------------------------------- delegated commands


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect_report import run_inspect

    check_output(args.out, "--out", folder=True)

    report = run_inspect(args.model, args.image, args.out, compare_path=args.compare, device=args.device)
    folder = report.parent
    print(json.dumps({"folder": str(folder), "report": str(report), "figure": str(folder / "redundancy.png")}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.__main__ import main as bench_main

    return int(bench_main(args.rest) or 0)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return int(demo_main(args.rest) or 0)


# ----------------------------------------------------------------------------------- parser


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, where it has one worth showing."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.required:  # 0 is a default, not False
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .core.config import PredictConfig, TrainConfig  # torch-free
    parser = argparse.ArgumentParser(
        prog="napari-selfreg",
        description="Train a SelfReg UNet on painted strokes, predict, measure, evaluate, inspect. "
        "Labels: 0 = not painted, 1 = background, 2.. = structures.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    shown = {"formatter_class": _DefaultsShown}

    p = sub.add_parser("train", help="train (or continue training) a model on painted strokes", **shown)
    p.add_argument("--image", action="append", required=True, help="image file (repeat for several)")
    p.add_argument("--labels", action="append", required=True, help="painted labels for the --image in the same place")
    p.add_argument("--out", required=True, type=Path, help="model file to write (.safetensors is added when missing)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="number of training steps (300 when neither is given)")
    budget.add_argument("--time-budget", type=float, help="train for this many seconds instead of --steps")
    p.add_argument("--no-selfreg", action="store_true", help="train without the SCR and IFD terms")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--seed", type=int, default=0, help="makes a CPU run repeatable")
    p.add_argument("--resume", type=Path, help="continue training from this model file (fine-tuning)")
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH,
                   help="base channels of the UNet (64 = the paper's width)")
    p.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help="number of down-samplings")
    p.add_argument("--patch-size", type=int, default=128, help="side of the training patches in pixels")
    p.add_argument("--batch-size", type=int, default=4, help="patches per step")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW's peak learning rate")
    p.add_argument("--lambda-scr", type=float, default=0.015, help="weight of SCR (0 leaves it out)")
    p.add_argument("--lambda-ifd", type=float, default=0.015, help="weight of IFD (0 leaves it out)")
    p.add_argument("--class-names", help="comma-separated names for labels 1, 2, ... (e.g. background,nuclei); "
                   "missing ones are 'class N'")
    p.add_argument("--keep", choices=("last", "best"), default="last",
                   help="which weights to save: the last step or the best Dice on held-out strokes")
    p.add_argument("--validate-every", type=int, default=TrainConfig.validation_every,
                   help="steps between two measurements of the Dice on held-out strokes")
    p.add_argument("--precision", default="auto",
                   help="auto | float32 | bfloat16 | float16 (float32 for a CPU shared with other work)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="segment images with a trained model (the model is loaded once)", **shown)
    p.add_argument("--model", required=True, type=Path, help="model file written by train")
    p.add_argument("--image", required=True, type=Path, nargs="+", action="extend",
                   help="image file(s); with several, the outputs' names hold {stem}")
    p.add_argument("--out", required=True, type=Path,
                   help="labels file (1 = background, 2.. = structures); {stem} becomes the image's name")
    p.add_argument("--probabilities", type=Path, help="also write per-class probabilities (K, H, W) float32")
    p.add_argument("--instances", type=Path,
                   help="also write instance ids of the structures (touching objects split; TIFF, NIfTI, MHA or NRRD)")
    p.add_argument("--uncertainty", type=Path,
                   help="also write where the model is unsure, (H, W) float32 from 0 (sure) to 1 (classes tie); "
                   "the summary gives its mean per image")
    p.add_argument("--measurements", type=Path,
                   help="also write a CSV table of the --instances objects (id, class, area, equivalent diameter, "
                   "perimeter, ellipse axes, eccentricity, circularity, solidity, centroid, bounding box, whether "
                   "it touches the edge, mean colour and its spread, and for RGB the mean hematoxylin and eosin "
                   "optical density); the summary gives per class the count, mean and median area, area fraction, and "
                   "median circularity and solidity")
    p.add_argument("--pixel-size", type=float,
                   help="side of a pixel in micrometres (e.g. 0.25 at 40x) for --measurements: adds area_um2, "
                   "equivalent_diameter_um, perimeter_um and the axes in um (default: the image file's pixel size "
                   "where it records one)")
    p.add_argument("--tile-size", type=int, default=PredictConfig.tile_size, help="pixels per tile side")
    p.add_argument("--overlap", type=float, default=PredictConfig.overlap, help="fraction shared by neighbours")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--precision", default="auto",
                   help="auto | float32 | bfloat16 | float16 (float16 needs CUDA or MPS; on a CPU it runs bfloat16)")
    p.add_argument("--flips", action="store_true", help="average the four flipped views of every tile (4x slower)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("measure", help="measure the objects of instance files (e.g. corrected in napari) into "
                       "CSV tables", **shown)
    p.add_argument("--instances", required=True, type=Path, nargs="+", action="extend",
                   help="object ids (0 = no object), e.g. written by predict --instances and corrected in napari")
    p.add_argument("--out", required=True, type=Path,
                   help="CSV table to write, one row per object (the columns of predict --measurements); "
                   "{stem} becomes each --instances file's name")
    p.add_argument("--labels", type=Path, nargs="+", action="extend",
                   help="the class map of each --instances file, in the same order (painting ids, e.g. predict's "
                   "--out): each object's class_id is the id most of its pixels have there (0 without it)")
    p.add_argument("--image", type=Path, nargs="+", action="extend",
                   help="the image of each --instances file, in the same order: adds each object's mean colour and "
                   "its spread, and for RGB the hematoxylin and eosin optical densities")
    p.add_argument("--pixel-size", type=float,
                   help="side of a pixel in micrometres (e.g. 0.25 at 40x): adds area_um2, equivalent_diameter_um, "
                   "perimeter_um and the axes in um (default: the --instances or --image file's pixel size where it "
                   "records one)")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("evaluate", help="Dice and IoU per class of predictions against masks (JSON)", **shown)
    p.add_argument("--prediction", required=True, type=Path, nargs="+", action="extend",
                   help="labels file(s) written by predict")
    p.add_argument("--mask", required=True, type=Path, nargs="+", action="extend",
                   help="ground truth, one per --prediction in the same order: 0/255, 0/1 or instance ids "
                   "(non-zero = structure), or painting ids without 0 (1 = background)")
    p.add_argument("--instances", type=Path, nargs="+", action="extend",
                   help="instance files written by predict --instances, one per --prediction: also match objects "
                   "one to one at IoU > 0.5 (F1, SQ, PQ) with the mask's instance ids, or with its connected "
                   "pieces where it holds none (touching objects then count as one)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("inspect", help="per-block feature redundancy maps and indices", **shown)
    p.add_argument("--model", required=True, type=Path, help="model file written by train")
    p.add_argument("--image", required=True, type=Path, help="image file")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--compare", type=Path, help="a second model to compare (e.g. trained without SelfReg)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="benchmarks (see `napari-selfreg bench --help`)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="open napari with the sample data and the widgets docked", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_demo)
    return parser


DELEGATED = {"bench": cmd_bench, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:  # `napari-selfreg predict ... | head`: the reader left; stop quietly
        import os

        # Python flushes stdout again at exit, which would print a second error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a shell reports a process ended by SIGPIPE


def _run(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        # these parse their own options (argparse would swallow a leading --help)
        return DELEGATED[argv[0]](argparse.Namespace(command=argv[0], rest=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as error:
        print(f"napari-selfreg {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValueError as error:  # settings out of range (dataclass checks)
        print(f"napari-selfreg {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError as error:  # numpy's allocation failures; torch's CPU ones are RuntimeErrors
        print(
            f"napari-selfreg {args.command}: error: out of memory ({error}); "
            "lower --patch-size, --batch-size or --tile-size",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C twice during training, or once elsewhere
        print(f"napari-selfreg {args.command}: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
