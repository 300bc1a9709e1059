"""What ``imfc eval`` writes: every point as CSV and JSON, per-frame scores, BD-rates, RD plots,
a side-by-side picture per clip and a markdown summary.

Curves "averaged over clips" average, per codec and setting (imfc operating point or anchor CRF),
the kbps and the metric over the clips, the usual way of pooling a test set. BD-rates are given on
those averaged curves and, per clip, as the mean over the clips where the curves overlap.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from evaluation.bdrate import BDRate, bd_rate, frontier
from evaluation.metrics import HIGHER_IS_BETTER, METRICS
from evaluation.rd_eval import IMFC, CodedPoint, RDPoint

BD_METRICS = ("psnr_rgb", "ms_ssim", "vmaf")
LABELS = {"psnr_rgb": "PSNR RGB (dB)", "psnr_y": "PSNR Y (dB)", "ssim": "SSIM (RGB)", "ms_ssim": "MS-SSIM (RGB)",
          "vmaf": "VMAF v0.6.1", "gmsd": "GMSD (lower is better)"}
LOW_OVERLAP = 0.5  # below this share of the quality range a BD-rate extrapolates more than it measures
COLORS = {IMFC: "tab:red", "x264": "tab:blue", "x265": "tab:green", "svtav1": "tab:purple",
          "svtav1 held": "tab:orange", "svtav1 at 128": "tab:brown"}


@dataclass(frozen=True)
class Curve:
    codec: str
    settings: tuple[str, ...]
    kbps: np.ndarray
    quality: dict[str, np.ndarray]  # metric name -> one value per setting


@dataclass(frozen=True)
class BDEntry:
    anchor: str
    metric: str
    pooled: BDRate  # on the curves averaged over clips
    per_clip: dict[str, BDRate]

    @property
    def per_clip_mean(self) -> float:
        valid = [b.percent for b in self.per_clip.values() if math.isfinite(b.percent)]
        return float(np.mean(valid)) if valid else math.nan

    @property
    def per_clip_valid(self) -> int:
        return sum(math.isfinite(b.percent) for b in self.per_clip.values())


def codecs_in(points: list[RDPoint]) -> list[str]:
    return list(dict.fromkeys(p.codec for p in points))


def curve(points: list[RDPoint], codec: str) -> Curve:
    """One codec's points averaged over clips, setting by setting (settings every clip has)."""
    clips = {p.clip for p in points}
    mine = [p for p in points if p.codec == codec]
    settings = [s for s in dict.fromkeys(p.setting for p in mine)
                if {p.clip for p in mine if p.setting == s} == clips]
    groups = [[p for p in mine if p.setting == s] for s in settings]
    kbps = np.array([np.mean([p.kbps for p in g]) for g in groups])
    quality = {m: np.array([np.mean([getattr(p, m) for p in g]) for g in groups]) for m in METRICS}
    order = np.argsort(kbps)
    return Curve(codec, tuple(settings[i] for i in order), kbps[order], {m: q[order] for m, q in quality.items()})


def bd_entries(points: list[RDPoint], metrics: tuple[str, ...] = BD_METRICS) -> list[BDEntry]:
    """imfc against every anchor, for each metric."""
    entries = []
    test = curve(points, IMFC)
    for anchor in [c for c in codecs_in(points) if c != IMFC]:
        ref = curve(points, anchor)
        for m in metrics:
            pooled = bd_rate(ref.kbps, ref.quality[m], test.kbps, test.quality[m], HIGHER_IS_BETTER[m])
            per_clip = {}
            for clip in dict.fromkeys(p.clip for p in points):
                a = [p for p in points if p.clip == clip and p.codec == anchor]
                t = [p for p in points if p.clip == clip and p.codec == IMFC]
                per_clip[clip] = bd_rate([p.kbps for p in a], [getattr(p, m) for p in a],
                                         [p.kbps for p in t], [getattr(p, m) for p in t], HIGHER_IS_BETTER[m])
            entries.append(BDEntry(anchor, m, pooled, per_clip))
    return entries


def write_points(points: list[RDPoint], csv_path: Path, json_path: Path, meta: dict, bd: list[BDEntry]) -> None:
    names = [f.name for f in fields(RDPoint)]
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for p in points:
            w.writerow([_fmt(getattr(p, n)) for n in names])
    payload = {**meta, "points": [asdict(p) for p in points],
               "bd_rate": [{"anchor": e.anchor, "metric": e.metric, "pooled": asdict(e.pooled),
                            "per_clip": {c: asdict(b) for c, b in e.per_clip.items()},
                            "per_clip_mean": e.per_clip_mean, "per_clip_valid": e.per_clip_valid} for e in bd]}
    json_path.write_text(json.dumps(payload, indent=1, default=_json_default, allow_nan=True) + "\n")


def read_anchor_points(json_path: Path, clips: dict[str, int]) -> list[RDPoint]:
    """The anchors' points of an earlier run's points.json (every codec but imfc, at full precision),
    for ``clips`` (name -> frames coded). Raises ValueError unless it holds every one of them at
    that many frames: a BD-rate is only meaningful on the same frames."""
    names = {f.name for f in fields(RDPoint)}
    try:
        rows = json.loads(Path(json_path).read_text())["points"]
        points = [RDPoint(**{k: v for k, v in r.items() if k in names}) for r in rows if r["codec"] != IMFC]
    except (OSError, TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{json_path}: not an imfc eval points.json ({e.__class__.__name__})") from None
    held: dict[str, set[int]] = {}
    for p in points:
        held.setdefault(p.clip, set()).add(p.frames)
    for clip, frames in clips.items():
        if held.get(clip) != {frames}:
            found = f"{', '.join(map(str, sorted(held[clip])))} frames" if clip in held else "no points"
            raise ValueError(f"{json_path}: clip {clip} has {found} there, {frames} here")
    return [p for p in points if p.clip in clips]


def write_frame_scores(coded: list[CodedPoint], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clip", "codec", "setting", "frame", *METRICS])
        for c in coded:
            columns = [getattr(c.scores, m) for m in METRICS]
            for i in range(len(columns[0])):
                w.writerow([c.point.clip, c.point.codec, c.point.setting, i, *(_fmt(float(col[i])) for col in columns)])


def plot_rd(points: list[RDPoint], metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    for codec in codecs_in(points):
        c = curve(points, codec)
        if len(c.kbps) == 0:
            continue
        # the line joins the frontier (what BD-rates integrate); points it leaves out stay as markers
        r, q = frontier(c.kbps, c.quality[metric], HIGHER_IS_BETTER[metric])
        line, = ax.plot(r, q, "o-", color=COLORS.get(codec), label=codec, markersize=4)
        ax.plot(c.kbps, c.quality[metric], "o", color=line.get_color(), markersize=3, alpha=0.5)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 20, 30, 50 rather than 2x10^1
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("kbps (every byte, log scale)")
    ax.set_ylabel(LABELS[metric])
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def closest_points(coded: list[CodedPoint]) -> list[CodedPoint]:
    """imfc's lowest-rate point, and for each anchor its point closest in log-rate to it."""
    imfc = min((c for c in coded if c.point.codec == IMFC), key=lambda c: c.point.kbps)
    chosen = [imfc]
    for codec in [k for k in dict.fromkeys(c.point.codec for c in coded) if k != IMFC]:
        chosen.append(min((c for c in coded if c.point.codec == codec),
                          key=lambda c: abs(math.log(c.point.kbps / imfc.point.kbps))))
    return chosen


def side_by_side(source: np.ndarray, coded: list[CodedPoint], sample_indices: list[int], path: Path) -> None:
    """Rows: the sample frames; columns: source, imfc, each anchor at the closest rate."""
    from PIL import Image, ImageDraw

    chosen = closest_points(coded)
    r = source.shape[1]
    label_h, gap = 44, 4
    cols = 1 + len(chosen)
    canvas = Image.new("RGB", (cols * (r + gap) - gap, label_h + len(sample_indices) * (r + gap) - gap), "white")
    draw = ImageDraw.Draw(canvas)
    titles = [("source", "", "")] + [(c.point.codec, c.point.setting, f"{c.point.kbps:.1f} kbps") for c in chosen]
    for j, lines in enumerate(titles):
        for k, text in enumerate(lines):
            draw.text((j * (r + gap) + 2, 2 + 13 * k), text, fill="black")
    for i, idx in enumerate(sample_indices):
        y = label_h + i * (r + gap)
        canvas.paste(Image.fromarray(source[idx]), (0, y))
        for j, c in enumerate(chosen, start=1):
            canvas.paste(Image.fromarray(c.samples[i]), (j * (r + gap), y))
            draw.text((j * (r + gap) + 3, y + r - 13), f"{c.scores.psnr_rgb[idx]:.1f} dB", fill="yellow")
    canvas.save(path)


def summary_markdown(points: list[RDPoint], bd: list[BDEntry], meta: dict) -> str:
    clips = list(dict.fromkeys(p.clip for p in points))
    lines = [f"Command: `{meta['command']}`", "",
             (f"{len(clips)} clips, {meta['frames']} frames each (fewer where a clip is shorter), "
             f"center square crop resized to {meta['resolution']}x{meta['resolution']}, each clip at its own frame rate; "
             f"model `{meta['model']}`; VMAF {'on' if meta['vmaf'] else 'off'}; run time {meta['seconds']:.0f} s."), "",
             "Anchors (low delay, video-call settings):", ""]
    lines += [f"- {s}" for s in meta["anchor_settings"].values()]
    av1 = any(s.startswith("av1 references") for s in meta["imfc_settings"])
    how = ("references coded as one SVT-AV1 low-delay stream; each other frame a token frame or a repeat of the "
           "newest reference, whichever costs less in MSE + lambda * bits; a kbps target is kept by a leaky bucket "
           "(imfc encode --kbps)" if av1 else
           "a frame whose reconstruction falls under the floor's PSNR becomes a keyframe, and keyint N forces one "
           "after N token frames")
    banks = "the decoder keeps 1 reference with AV1 references, 2 with learned keyframes, unless a setting names its bank"
    lines += [f"- imfc: {'; '.join(meta['imfc_settings'])} (closed loop; {banks}; {how})", ""]
    lines += ["Averaged over clips (per codec and setting):", "",
              "| codec | setting | kbps | PSNR RGB | PSNR Y | SSIM | MS-SSIM | VMAF | GMSD |", "|---|---|---|---|---|---|---|---|---|"]
    for codec in codecs_in(points):
        c = curve(points, codec)
        for i, s in enumerate(c.settings):
            q = {m: c.quality[m][i] for m in METRICS}
            lines.append(f"| {codec} | {s} | {c.kbps[i]:.1f} | {q['psnr_rgb']:.2f} | {q['psnr_y']:.2f} | {q['ssim']:.4f} | "
                         f"{q['ms_ssim']:.4f} | {q['vmaf']:.1f} | {q['gmsd']:.4f} |")
    lines += ["", ("BD-rate of imfc against each anchor (PCHIP on log-rate; negative = imfc needs fewer bits for "
              "the same quality; n/a = the quality ranges do not overlap; low overlap = the curves share under "
              f"{LOW_OVERLAP:.0%} of their quality range, so the figure rests on a sliver of either curve):"), "",
              "| anchor | metric | BD-rate, averaged curves | quality range integrated | overlap | mean of per-clip BD-rates (clips with overlap) |",
              "|---|---|---|---|---|---|"]
    for e in bd:
        pooled = "n/a" if not math.isfinite(e.pooled.percent) else f"{e.pooled.percent:+.1f} %"
        if math.isfinite(e.pooled.percent) and e.pooled.overlap < LOW_OVERLAP:
            pooled += " (low overlap)"
        rng = "none" if not math.isfinite(e.pooled.low) else f"{e.pooled.low:.3g} .. {e.pooled.high:.3g}"
        per = "n/a" if not e.per_clip_valid else f"{e.per_clip_mean:+.1f} %"
        lines.append(f"| {e.anchor} | {LABELS[e.metric]} | {pooled} | {rng} | {e.pooled.overlap:.0%} | "
                     f"{per} ({e.per_clip_valid}/{len(e.per_clip)}) |")
    return "\n".join(lines) + "\n"


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    raise TypeError(f"cannot serialize {type(v)}")


def write_report(folder: Path, coded: list[CodedPoint], meta: dict, with_vmaf: bool,
                 earlier: list[RDPoint] = ()) -> None:
    """Every output but the side-by-side pictures (written per clip as the run goes) into ``folder``;
    ``earlier``: points measured by an earlier run on the same frames (`read_anchor_points`)."""
    points = [c.point for c in coded] + list(earlier)
    bd = bd_entries(points)
    write_points(points, folder / "points.csv", folder / "points.json", meta, bd)
    write_frame_scores(coded, folder / "frames.csv")
    r = meta["resolution"]
    title = f"{len(meta['clips'])} clips x {meta['frames']} frames, {r}x{r}, averaged over clips"
    for m in METRICS:
        if with_vmaf or m != "vmaf":
            plot_rd(points, m, folder / f"rd_{m}.png", title)
    (folder / "summary.md").write_text(summary_markdown(points, bd, meta))
