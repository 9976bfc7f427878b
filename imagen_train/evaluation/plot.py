"""The FID-vs-CLIP trade-off curve as a PNG: matplotlib when installed, else drawn with PIL."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def plot_tradeoff(rows: list[dict], path: str | Path, title: str = "FID vs CLIP score") -> Path:
    """x: CLIP score, y: FID, one point per guidance scale, joined in scale order and labelled."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pts = [(r["clip_score"], r["fid"], r["guidance_scale"]) for r in rows]
    try:  # optional dependency: without matplotlib the plot is drawn with PIL
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(pts, path, title)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    for x, y, s in pts:
        ax.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("CLIP score (mean cosine)")
    ax.set_ylabel("FID")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_pil(pts: list[tuple[float, float, float]], path: Path, title: str) -> Path:
    w, h, margin = 640, 480, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x0, x1 = (x0 - 0.05 * (x1 - x0 or 1), x1 + 0.05 * (x1 - x0 or 1))
    y0, y1 = (y0 - 0.05 * (y1 - y0 or 1), y1 + 0.05 * (y1 - y0 or 1))
    to_px = (lambda x, y: (margin + (x - x0) / (x1 - x0) * (w - 2 * margin),
                           h - margin - (y - y0) / (y1 - y0) * (h - 2 * margin)))
    d.line([(margin, margin), (margin, h - margin), (w - margin, h - margin)], fill="black", width=1)
    for i in range(5):  # ticks
        fx, fy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        px, _ = to_px(fx, y0)
        _, py = to_px(x0, fy)
        d.line([(px, h - margin), (px, h - margin + 4)], fill="black")
        d.text((px - 15, h - margin + 6), f"{fx:.3f}", fill="black")
        d.line([(margin - 4, py), (margin, py)], fill="black")
        d.text((4, py - 6), f"{fy:.2f}", fill="black")
    line = [to_px(x, y) for x, y, _ in pts]
    if len(line) > 1:
        d.line(line, fill=(31, 119, 180), width=2)
    for (px, py), (_, _, s) in zip(line, pts):
        d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=(31, 119, 180))
        d.text((px + 6, py - 12), f"{s:g}", fill="black")
    d.text((w // 2 - 60, 10), title, fill="black")
    d.text((w // 2 - 70, h - 20), "CLIP score (mean cosine)", fill="black")
    d.text((8, 24), "FID", fill="black")
    img.save(path, format="PNG")
    return path
