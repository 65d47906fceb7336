"""reports/index.html: the page to open after `make run`.

It gathers what the pipeline stages wrote: the data previews, the poster study (table,
figure grid, grain-size distributions, the quality-against-quantity answer), the boundary
evaluation, the tuning studies and their plots, the recognition figures and confusion
matrices, and the registry state. Images are linked relative to the report folder.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from grainlab.config import Params
from grainlab.images import atomic_path

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #aaa; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
td, th { border: 1px solid #bbb; padding: 3px 8px; text-align: right; } th { background: #eee; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.missing { color: #a00; } code { background: #f4f4f4; padding: 1px 4px; }
"""


def markdown_to_html(text: str) -> str:
    """The Markdown the stages write: headings, pipe tables, bullet lists and paragraphs."""
    out, table, bullets = [], [], []

    def flush():
        if table:
            rows = [
                [c.strip() for c in line.strip().strip("|").split("|")]
                for line in table
                if not set(line.replace("|", "").strip()) <= set("-: ")
            ]
            head, body = rows[0], rows[1:]
            out.append(
                "<table><tr>"
                + "".join(f"<th>{_inline(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                + "</table>"
            )
            table.clear()
        if bullets:
            out.append("<ul>" + "".join(f"<li>{_inline(b)}</li>" for b in bullets) + "</ul>")
            bullets.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            table.append(stripped)
            continue
        if stripped.startswith(("- ", "* ")):
            bullets.append(stripped[2:])
            continue
        flush()
        if stripped.startswith("#"):
            level = min(len(stripped) - len(stripped.lstrip("#")) + 2, 6)
            out.append(f"<h{level}>{_inline(stripped.lstrip('#').strip())}</h{level}>")
        elif stripped.startswith("!["):
            continue  # images are embedded by the section itself
        elif stripped:
            out.append(f"<p>{_inline(stripped)}</p>")
    flush()
    return "\n".join(out)


def _inline(text: str) -> str:
    text = html.escape(text)
    parts = text.split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _images(folder: Path, report_dir: Path, pattern: str = "*.png") -> str:
    files = sorted(folder.glob(pattern)) if folder.is_dir() else []
    return "\n".join(
        f'<figure><img src="{html.escape(os.path.relpath(f, report_dir))}" alt="{html.escape(f.stem)}">'
        f"<figcaption>{html.escape(f.stem.replace('_', ' '))}</figcaption></figure>"
        for f in files
    )


def _markdown_files(folder: Path) -> str:
    files = sorted(folder.glob("*.md")) if folder.is_dir() else []
    return "\n".join(markdown_to_html(f.read_text()) for f in files)


def _missing(what: str, command: str) -> str:
    return f'<p class="missing">No {html.escape(what)} yet: run <code>{html.escape(command)}</code>.</p>'


def _tuning_section(tuning_dir: Path, report_dir: Path) -> str:
    parts = []
    for kind in ("boundaries", "recognition"):
        folder = tuning_dir / kind
        summary_path = folder / "summary.json"
        if not summary_path.is_file():
            parts.append(_missing(f"{kind} tuning study", f"grainlab tune {kind}"))
            continue
        summary = json.loads(summary_path.read_text())
        counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items() if n)
        rows = "".join(
            f"<tr><td>{t['number']}</td><td>{t['state']}</td><td>{_number(t['value'])}</td>"
            f"<td>{html.escape(json.dumps(t['params']))}</td></tr>"
            for t in summary["trials"]
        )
        best = (folder / "best_params.yaml").read_text() if (folder / "best_params.yaml").is_file() else ""
        parts.append(
            f"<h3>{kind}: study <code>{html.escape(summary['study'])}</code></h3><p>{counts}; best objective "
            f"{_number(summary['best_value']) or 'none'}.</p>"
            f"<table><tr><th>trial</th><th>state</th><th>objective</th><th>params</th></tr>{rows}</table>"
            f"<p>Best parameters, in params.yaml's shape:</p><pre>{html.escape(best)}</pre>"
            + _images(folder, report_dir)
        )
    return "\n".join(parts)


def _number(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _registry_section(path: Path) -> str:
    if not path.is_file():
        return _missing("registry state", "grainlab register")
    state = json.loads(path.read_text())
    rows = []
    for m in state["models"]:
        if "version" in m:
            score = next((f"{k} = {v:.4f}" for k, v in m.items() if "/" in k and isinstance(v, float)), "")
            rows.append(
                f"<tr><td>{m['model']}</td><td>{m['version']}</td><td>{m['alias']}</td>"
                f"<td>{html.escape(m['run_name'] or '')}</td><td>{score}</td></tr>"
            )
        else:
            rows.append(f"<tr><td>{m['model']}</td><td colspan=4>{html.escape(m['status'])}</td></tr>")
    return (
        "<table><tr><th>model</th><th>version</th><th>alias</th><th>run</th><th>held-out</th></tr>"
        + "".join(rows)
        + "</table><p>Serve the champion: <code>make serve</code>.</p>"
    )


def write_report(params: Params, out_dir: Path, outputs: Path = Path("outputs")) -> Path:
    """Write out_dir/index.html from the stage outputs under out_dir and outputs/."""
    out_dir = Path(out_dir)
    sections = [
        ("Data", _images(out_dir / "preview", out_dir) or _missing("previews", "grainlab data preview")),
        (
            "Boundary tracing: the poster study",
            (_markdown_files(out_dir / "boundaries") + _images(out_dir / "boundaries", out_dir))
            or _missing("poster study", "grainlab boundaries study"),
        ),
        ("Hyperparameter tuning", _tuning_section(outputs / "tuning", out_dir)),
        (
            "Microstructure recognition",
            (_markdown_files(out_dir / "recognition") + _images(out_dir / "recognition", out_dir, "**/*.png"))
            or _missing("recognition evaluation", "grainlab recognition evaluate"),
        ),
        ("Model registry", _registry_section(outputs / "registry.json")),
    ]
    body = "\n".join(f"<h2>{html.escape(title)}</h2>\n{content}" for title, content in sections)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>grainlab report</title><style>{CSS}</style>"
        f"</head><body><h1>grainlab report ({html.escape(params.profile)} profile, seed {params.seed})</h1>"
        f"{body}</body></html>\n"
    )
    out = out_dir / "index.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page)
    return out
