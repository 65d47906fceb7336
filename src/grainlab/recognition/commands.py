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
    evaluate.add_argument(
        "--seeds",
        type=int,
        default=0,
        help="also draw this many fresh quizzes (same classes and settings, new random images, seeds "
        "that no library, training or selection used) and report mean ± sd and per-quiz figures",
    )
    evaluate.add_argument(
        "--first-seed",
        type=int,
        default=None,
        help="the first fresh-quiz seed (default: microstructures.FRESH_SEED_BASE = 1000000)",
    )
    evaluate.add_argument(
        "--quiz-dir",
        default=None,
        help="where the fresh quizzes are rendered (default: a temporary folder, removed afterwards)",
    )
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
            sel = recognizer.selection
            if sel is not None:  # what the held-out training images chose (also in gmm.json)
                tracking.log_params(
                    {
                        "selected.gmm_components": sel["gmm_components"],
                        "selected.none_percentile": sel["none_percentile"],
                    }
                )
                tracking.log_metrics(
                    {
                        "select/gmm_components": sel["gmm_components"],
                        "select/heldout_accuracy": sel["accuracy"],
                        "select/heldout_false_none": sel["false_none"],
                        "select/heldout_images": len(sel["holdout_images"]),
                        "select/seconds": recognizer.selection_seconds,
                        **(
                            {"select/none_percentile": sel["none_percentile"]}
                            if sel["none_percentile"] is not None
                            else {}
                        ),
                    }
                )
                print(
                    f"{name}: held-out selection ({len(sel['holdout_images'])} training images): "
                    f"{sel['gmm_components']} GMM components, none percentile {sel['none_percentile']}, "
                    f"held-out accuracy {sel['accuracy']:.3f}, false 'none' {sel['false_none']:.3f} "
                    f"({recognizer.selection_seconds:.1f} s)"
                )
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
    from grainlab.recognition.evaluate import comparison_table, fresh_table, run_quiz, write_report
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
        fresh = _fresh_quizzes(args, params, library, models, found) if args.seeds else {}
        if fresh:
            fresh_md = fresh_table(fresh)
            (reports / "fresh_quizzes.md").write_text(
                f"# Recognition on {args.seeds} fresh quizzes\n\n" + fresh_md
            )
            for name, summary in fresh.items():
                all_metrics[name].update(summary)
                tracking.log_metrics({f"{name}/{k}": v for k, v in summary.items()})
        tracking.log_artifacts(reports, "reports")
    print(table)
    if fresh:
        print(fresh_md)
    write_json(
        Path(args.metrics) if args.metrics else reports / "metrics.json",
        {f"{n}/{k}": v for n, m in all_metrics.items() for k, v in m.items()},
    )


def _fresh_quizzes(args, params, library: Path, models: Path, found) -> dict[str, dict]:
    """Draw `args.seeds` fresh quizzes and score every found model on each: {model: fresh_summary}.
    The training library is only read (its manifest's seed and image size), never written."""
    import tempfile

    from grainlab.datasets.microstructures import build_quiz, fresh_seeds, load_manifest, plan_library
    from grainlab.recognition.evaluate import fresh_summary, quiz_metrics, run_quiz
    from grainlab.recognition.predict import Recognizer
    from grainlab.recognition.train import load_images

    cfg, micro_cfg = params.recognition, params.microstructures
    if args.seeds < 0:
        raise GrainlabError(f"--seeds = {args.seeds}: expected a number of fresh quizzes, 0 or more")
    manifest = load_manifest(library)
    if manifest.get("image_px") != micro_cfg.image_px:
        raise GrainlabError(
            f"{library}: images of {manifest.get('image_px')} px, but microstructures.image_px = "
            f"{micro_cfg.image_px}; expected the settings the library was built with"
        )

    def quiz_counts(images):
        return sorted(
            (
                e["task"],
                e["class"],
                sum(1 for f in images if f["split"] == "quiz" and f["class"] == e["class"]),
            )
            for e in {(e["task"], e["class"]): e for e in images if e["split"] == "quiz"}.values()
        )

    if quiz_counts(plan_library(micro_cfg, manifest["seed"])) != quiz_counts(manifest["images"]):
        raise GrainlabError(
            f"{library}: its quizzes differ from those the microstructures settings plan; expected the "
            "settings the library was built with"
        )
    # Training members use seed .. seed + members - 1, the held-out split the seed itself.
    used = {int(manifest["seed"]), *(params.seed + m for m in range(cfg.members))}
    seeds = fresh_seeds(args.seeds, used, args.first_seed)
    tasks = sorted({task for _, task in found})
    recognizers = {name: Recognizer.load(models / name, cfg.device) for name, _ in found}
    per_quiz: dict[str, dict[int, dict]] = {name: {} for name, _ in found}
    with tempfile.TemporaryDirectory(prefix="grainlab-fresh-quiz-") as tmp:
        base = Path(args.quiz_dir) if args.quiz_dir else Path(tmp)
        for seed in seeds:
            quiz_dir = build_quiz(micro_cfg, base / f"seed{seed}", seed, tasks, params.data.workers)
            for name, task in found:
                quiz = load_images(quiz_dir, task, "quiz")
                result = run_quiz(recognizers[name], quiz, name, cfg.eval_crops, cfg.batch_size, params.seed)
                per_quiz[name][seed] = quiz_metrics(result)
                m = per_quiz[name][seed]
                print(
                    f"{name} fresh quiz seed {seed}: accuracy {m['quiz_accuracy']:.3f}"
                    + (f", AUROC {m['open_set_auroc']:.3f}, FPR95 {m['fpr95']:.3f}" if "fpr95" in m else ""),
                    flush=True,
                )
    return {name: fresh_summary(per) for name, per in per_quiz.items()}
