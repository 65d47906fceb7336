"""`grainlab recognition ...`: train the recognizers, classify one micrograph, evaluate the quizzes."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from grainlab.cli import params_from
from grainlab.errors import GrainlabError, short
from grainlab.images import write_json

NOMAG = "-nomag"
RUN_FILE = "run.json"  # the MLflow run that trained a model
PX_PER_UM_RANGE = (0.01, 10_000.0)  # a physically sensible magnification: 100 um to 0.1 nm per pixel
MAX_CROPS = 1_000_000


def register(groups, common):
    rec = groups.add_parser("recognition", help="microstructure recognition: train, classify, evaluate")
    verbs = rec.add_subparsers(dest="verb", metavar="VERB", required=True)

    train = verbs.add_parser(
        "train",
        parents=[common],
        help="train the triplet network and its open-set GMMs (MLflow tracked)",
        description="Train one recognizer per task in recognition.tasks (quiz1: 5 steels; quiz2: 6 martensitic "
        "variants) and, with recognition.ablation, a quiz-1 twin without the magnification input. Each model "
        "goes to OUT/TASK (model.pt + gmm.json) and is one MLflow run with a logged pyfunc model.",
    )
    train.add_argument("--data", default=None, help="library folder (default: DATA_ROOT/microstructures)")
    train.add_argument("--out", default=None, help="model folder (default: recognition.out_dir)")
    train.add_argument("--metrics", default=None, help="metrics JSON (default: OUT/train_metrics.json)")
    train.set_defaults(func=run_train)

    classify = verbs.add_parser(
        "classify",
        parents=[common],
        help="classify one micrograph and write its saliency overlay",
        description="Average the class probabilities (with 'none of these') of many random crops of IMAGE; "
        "print the distribution and write a saliency overlay PNG.",
    )
    classify.add_argument("image", help="micrograph (PNG, TIFF or JPEG)")
    classify.add_argument(
        "--px-per-um",
        required=True,
        help=f"magnification in pixels per micrometre ({PX_PER_UM_RANGE[0]:g} to {PX_PER_UM_RANGE[1]:g})",
    )
    classify.add_argument(
        "--model",
        default=None,
        help="model folder, runs:/ID/model or models:/NAME/VERSION (default: OUT_DIR/quiz1)",
    )
    classify.add_argument(
        "--crops", type=int, default=None, help="crops, at least 1 (default: recognition.predict_crops)"
    )
    classify.add_argument(
        "--out", default=None, help="saliency PNG (default: outputs/recognition/classify/STEM.png)"
    )
    classify.set_defaults(func=run_classify)

    evaluate = verbs.add_parser(
        "evaluate",
        parents=[common],
        help="score the trained models on the quiz sets",
        description="Quiz accuracy ('none' counted), closed-set accuracy, open-set AUROC and OSCR, confusion "
        "matrix, per-image probability table, descriptor scatter with GMM contours and saliency examples, for "
        "every trained model, and the with/without magnification comparison.",
    )
    evaluate.add_argument("--data", default=None, help="library folder (default: DATA_ROOT/microstructures)")
    evaluate.add_argument("--models", default=None, help="model folder (default: recognition.out_dir)")
    evaluate.add_argument("--out", default="reports/recognition", help="report folder (default: %(default)s)")
    evaluate.add_argument("--metrics", default=None, help="metrics JSON (default: OUT/metrics.json)")
    evaluate.set_defaults(func=run_evaluate)


def _library(args, params) -> Path:
    return Path(args.data) if args.data else Path(params.data.root) / "microstructures"


def model_variants(cfg) -> list[tuple[str, str, bool]]:
    """(model name, task, use_magnification) of every model `train` makes."""
    out = []
    for task in cfg.tasks:
        out.append((task if cfg.use_magnification else task + NOMAG, task, cfg.use_magnification))
        if cfg.ablation and cfg.use_magnification and task == "quiz1":
            out.append((task + NOMAG, task, False))
    return out


def run_train(args):
    from grainlab import tracking
    from grainlab.config import flatten
    from grainlab.recognition.train import load_images, train_recognizer
    from grainlab.serving import log_recognizer_model

    params = params_from(args)
    library = _library(args, params)
    out = Path(args.out or params.recognition.out_dir)
    summary = {}
    for name, task, use_mag in model_variants(params.recognition):
        cfg = dataclasses.replace(params.recognition, use_magnification=use_mag)
        data = load_images(library, task, "train")
        run_params = {**flatten(dataclasses.replace(params, recognition=cfg)), "task": task, "model": name}
        start = time.perf_counter()
        history = {}

        def on_epoch(step, metrics, history=history, name=name, cfg=cfg):
            history.update(metrics)
            tracking.log_metrics(metrics, step=step)
            print(
                f"{name} member {metrics['train/member'] + 1}/{cfg.members} "
                f"epoch {step % cfg.epochs + 1}/{cfg.epochs}: triplet loss {metrics['train/triplet_loss']:.4f}",
                flush=True,
            )

        tags = tracking.standard_tags(
            task=task, model=name, stage="recognition-train", profile=params.profile
        )
        with tracking.run(
            tracking.RECOGNITION_EXPERIMENT,
            run_name=name,
            params=run_params,
            tags=tags,
            dataset=(f"{library.name}/{task}", library),
        ) as active:
            recognizer = train_recognizer(cfg, data, params.seed, on_epoch)
            tracking.set_tags({"device": str(recognizer.device)})
            model_dir = recognizer.save(out / name)
            write_json(model_dir / RUN_FILE, {"run_id": active.info.run_id})
            for m, gmm in enumerate(recognizer.gmms):
                tracking.log_metrics({"train/none_threshold": gmm.threshold}, step=m)
            final = {"train/triplet_loss": history["train/triplet_loss"]}
            seconds = time.perf_counter() - start
            tracking.log_metrics(
                {**final, "train/seconds": seconds}
            )  # the time in MLflow, not in DVC's metrics
            tracking.log_artifacts(model_dir, "model")
            log_recognizer_model(model_dir, recognizer.labels)
        summary.update({f"{name}/{k.split('/')[-1]}": v for k, v in final.items()})
        print(f"{name}: saved {model_dir} ({seconds:.0f} s)")
    write_json(Path(args.metrics) if args.metrics else out / "train_metrics.json", summary)


def _load_model(spec: str | None, out_dir: str, device: str):
    from grainlab import tracking
    from grainlab.recognition.predict import Recognizer

    if spec and (spec.startswith("runs:/") or spec.startswith("models:/")):
        return Recognizer.load(tracking.download_model_checkpoint(spec).parent, device)
    return Recognizer.load(Path(spec or Path(out_dir) / "quiz1"), device)


def run_classify(args):
    from grainlab.images import read_image
    from grainlab.recognition.crops import check_px_per_um
    from grainlab.recognition.predict import write_saliency_figure

    params = params_from(args)
    cfg = params.recognition
    m = check_px_per_um(args.px_per_um, "--px-per-um")
    lo, hi = PX_PER_UM_RANGE
    if not lo <= m <= hi:
        raise GrainlabError(
            f"--px-per-um = {short(args.px_per_um)}: expected the magnification in pixels per micrometre, "
            f"a number between {lo:g} and {hi:g}"
        )
    n_crops = cfg.predict_crops if args.crops is None else args.crops
    if not 1 <= n_crops <= MAX_CROPS:
        raise GrainlabError(
            f"--crops = {short(args.crops)}: expected a number of crops between 1 and {MAX_CROPS}"
        )
    recognizer = _load_model(args.model, cfg.out_dir, cfg.device)
    img = read_image(args.image, max_pixels=params.data.max_image_pixels)
    pred = recognizer.predict(
        img,
        m,
        n_crops=n_crops,
        batch_size=cfg.batch_size,
        seed=params.seed,
        what=args.image,
    )
    for label, p in sorted(zip(pred.labels, pred.distribution, strict=True), key=lambda t: -t[1]):
        print(f"{label:20s} {p:6.3f}")
    print(f"answer: {pred.answer}")
    print(
        f"typicality: {pred.typicality:.2f} (median over the crops of the best class log-likelihood "
        "minus the 'none' threshold; below 0, most crops are 'none of these')"
    )
    if pred.extrapolating:
        lo, hi = recognizer.px_per_um_range
        print(
            f"warning: {m:g} px/um is outside the trained range {lo:g}-{hi:g} px/um; the answer is an extrapolation"
        )
    out = Path(args.out or Path("outputs/recognition/classify") / f"{Path(args.image).stem}.png")
    write_saliency_figure(img, pred, out, f"{Path(args.image).name}, {m:g} px/um")
    print(f"wrote {out}")


def run_evaluate(args):
    from grainlab import tracking
    from grainlab.recognition.evaluate import comparison_table, run_quiz, write_report
    from grainlab.recognition.predict import Recognizer
    from grainlab.recognition.train import load_images

    params = params_from(args)
    cfg = params.recognition
    models, library, reports = Path(args.models or cfg.out_dir), _library(args, params), Path(args.out)
    found = [(n, t) for n, t, _ in model_variants(cfg) if (models / n / "model.pt").is_file()]
    if not found:
        raise GrainlabError(
            f"{models}: no trained recognition models; run `grainlab recognition train` first"
        )
    all_metrics: dict[str, dict] = {}
    tags = tracking.standard_tags(stage="recognition-evaluate", profile=params.profile)
    with tracking.run(tracking.RECOGNITION_EXPERIMENT, run_name="evaluate", tags=tags):
        for name, task in found:
            recognizer = Recognizer.load(models / name, cfg.device)
            quiz = load_images(library, task, "quiz")
            result = run_quiz(recognizer, quiz, name, cfg.eval_crops, cfg.batch_size, params.seed)
            metrics = write_report(recognizer, result, reports / name)
            all_metrics[name] = metrics
            tracking.log_metrics({f"{name}/{k}": v for k, v in metrics.items()})
            run_file = models / name / RUN_FILE
            if run_file.is_file():  # the quiz scores also go to the model's training run (for the registry)
                train_run = json.loads(run_file.read_text())["run_id"]
                tracking.log_to_run(
                    train_run,
                    {f"quiz/{k.removeprefix('quiz_')}": v for k, v in metrics.items()},
                    finish=False,
                )
            print(
                f"{name}: quiz accuracy {metrics['quiz_accuracy']:.3f}, closed-set {metrics['closed_accuracy']:.3f}"
                + (
                    f", AUROC {metrics['open_set_auroc']:.3f}, OSCR {metrics['oscr']:.3f}"
                    if "oscr" in metrics
                    else ""
                )
            )
        table = comparison_table(all_metrics)
        (reports / "comparison.md").write_text("# Recognition quiz results\n\n" + table)
        tracking.log_artifacts(reports, "reports")
    print(table)
    write_json(
        Path(args.metrics) if args.metrics else reports / "metrics.json",
        {f"{n}/{k}": v for n, m in all_metrics.items() for k, v in m.items()},
    )
