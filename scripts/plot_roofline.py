#!/usr/bin/env python3
"""Roofline plot of an `mlart bench --json` file, as SVG (standard library only).

usage: python3 scripts/plot_roofline.py BENCH.json OUT.svg

Log-log axes: arithmetic intensity (FLOP per cache byte) against GFLOP/s.
The roof is the DRAM read bandwidth line and the FP32 FMA peak (the "used"
ceilings of the run: the max of the before and after measurements). One
filled marker per point (color: KV format; shape: dense or sparse), the
scalar reference kernel of the same point as a hollow marker joined to it.
Every marker carries a <title> with the full figures (a tooltip in browsers).
"""

import json
import math
import sys
from xml.sax.saxutils import escape

W, H = 900, 600
LEFT, RIGHT, TOP, BOTTOM = 78, 222, 62, 58
PW, PH = W - LEFT - RIGHT, H - TOP - BOTTOM

FORMAT_COLORS = {
    "bf16": "#1f77b4",
    "fp8_v32": "#d62728",
    "fp8_model1": "#9467bd",
    "f16": "#2ca02c",
    "f32": "#8c564b",
}
FALLBACK_COLORS = ["#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
SEP = " \u00b7 "
FONT = "font-family='DejaVu Sans, Arial, Helvetica, sans-serif'"


def ceilings(doc):
    """(used, before, after) as dicts with fma_gflops and read_gbytes_per_s."""
    c = doc.get("ceilings", {})
    used = c.get("used", c)  # files before before/after had only one set
    return used, c.get("before"), c.get("after")


def fmt_num(v):
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def tick_label(v):
    if v >= 1:
        return f"{v:,.0f}".replace(",", "\u2009")
    return f"{v:g}"


TICK2 = " font-size='10' fill='#555'"


def nice_log(v, down):
    """log10 of the 1-2-5 value next to v (below it if down, else above)."""
    e = math.floor(math.log10(v))
    steps = [m * 10.0**k for k in (e - 1, e, e + 1) for m in (1, 2, 5)]
    pick = max(s for s in steps if s <= v * 1.0000001) if down else min(s for s in steps if s >= v / 1.0000001)
    return math.log10(pick)


def ticks(lo, hi):
    """(value, kind) for log axis [lo, hi]: kind major (decades), mid (2 and 5,
    labelled when the axis spans at most 3 decades) or minor."""
    out = []
    label_mid = hi - lo <= 3.01
    for e in range(math.floor(lo) - 1, math.ceil(hi) + 1):
        for m in range(1, 10):
            v = m * 10.0**e
            if lo - 1e-9 <= math.log10(v) <= hi + 1e-9:
                kind = "major" if m == 1 else ("mid" if m in (2, 5) and label_mid else "minor")
                out.append((v, kind))
    return out


def short_n(n):
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def marker(shape, x, y, r, color, filled, title, extra=""):
    fill = color if filled else "white"
    style = f"fill='{fill}' stroke='{color}' stroke-width='{1.2 if filled else 1.6}'"
    if filled:
        style += " fill-opacity='0.85'"
    t = f"<title>{escape(title)}</title>" if title else ""
    if shape == "circle":
        return f"<circle cx='{x:.1f}' cy='{y:.1f}' r='{r:.1f}' {style}{extra}>{t}</circle>"
    if shape == "triangle":
        h = r * 1.25
        pts = f"{x:.1f},{y - h:.1f} {x - h:.1f},{y + h * 0.75:.1f} {x + h:.1f},{y + h * 0.75:.1f}"
        return f"<polygon points='{pts}' {style}{extra}>{t}</polygon>"
    s = r * 0.9
    return f"<rect x='{x - s:.1f}' y='{y - s:.1f}' width='{2 * s:.1f}' height='{2 * s:.1f}' {style}{extra}>{t}</rect>"


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        doc = json.load(f)
    points = doc.get("points", [])
    if not points:
        print(f"{argv[1]}: no points", file=sys.stderr)
        return 1
    used, before, after = ceilings(doc)
    # The compute roof: the kernel's own ceiling when the run recorded one
    # (e.g. vdpbf16ps for Q·Kᵀ blended with FMA for P·V), else the FMA peak.
    top = doc.get("ceilings", {})
    fma = float(top.get("compute_gflops") or used.get("fma_gflops") or 0.0)
    roof_name = top.get("compute_name") or "fp32 fma"
    roof_label = "FP32 FMA peak" if roof_name == "fp32 fma" else f"compute peak ({roof_name})"
    bw = float(used["read_gbytes_per_s"])

    for p in points:
        if p.get("intensity") is None:  # older files
            p["intensity"] = p["gflops"] / p["gbytes_per_s"]
        if p.get("scalar_gflops") is None and p.get("scalar_seconds"):
            p["scalar_gflops"] = p["gflops"] * p["seconds"] / p["scalar_seconds"]

    # Axis ranges: 1-2-5 values covering the points, the ridge and the peak.
    xs = [p["intensity"] for p in points]
    ys = [p["gflops"] for p in points] + [p["scalar_gflops"] for p in points if p.get("scalar_gflops")]
    ridge = fma / bw if fma > 0 else None
    x_lo = min(xs + ([ridge / 3] if ridge else []))
    x_hi = max(xs + ([ridge * 3] if ridge else []))
    y_lo = min(ys)
    y_hi = max(ys + ([fma] if fma > 0 else []))
    x0, x1 = nice_log(x_lo / 1.3, down=True), nice_log(x_hi * 1.15, down=False)
    y0, y1 = nice_log(y_lo / 1.4, down=True), nice_log(y_hi * 1.35, down=False)

    def X(v):
        return LEFT + (math.log10(v) - x0) / (x1 - x0) * PW

    def Y(v):
        return TOP + PH - (math.log10(v) - y0) / (y1 - y0) * PH

    out = []
    add = out.append
    add(f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' viewBox='0 0 {W} {H}' {FONT} font-size='12'>")
    add(f"<rect width='{W}' height='{H}' fill='white'/>")

    # Title.
    title = f"mlart {doc.get('version', '')} decode roofline \u2014 {doc.get('device', '?')}, {doc.get('threads', '?')} threads, {doc.get('cpu_isa', '?')} kernel"
    add(f"<text x='{W / 2:.0f}' y='24' text-anchor='middle' font-size='16' font-weight='bold'>{escape(title)}</text>")
    sub = []
    if doc.get("date"):
        sub.append(f"{doc['date']} UTC")
    if "reference_isa" in doc:
        sub.append("hollow: scalar reference kernel" if doc.get("reference_isa") else "no scalar reference")
    sub.append("ceilings: max of before/after measurements" if before else "ceilings measured in the run")
    add(f"<text x='{W / 2:.0f}' y='44' text-anchor='middle' font-size='12' fill='#444'>{escape(SEP.join(sub))}</text>")

    # Grid, ticks and axis labels.
    add(f"<clipPath id='plot'><rect x='{LEFT}' y='{TOP}' width='{PW}' height='{PH}'/></clipPath>")
    for v, kind in ticks(x0, x1):
        x = X(v)
        major = kind == "major"
        add(f"<line x1='{x:.1f}' y1='{TOP}' x2='{x:.1f}' y2='{TOP + PH}' stroke='{'#ccc' if major else '#eee'}' stroke-width='1'/>")
        add(f"<line x1='{x:.1f}' y1='{TOP + PH}' x2='{x:.1f}' y2='{TOP + PH + (6 if major else 3)}' stroke='#333'/>")
        if kind != "minor":
            add(f"<text x='{x:.1f}' y='{TOP + PH + 20}' text-anchor='middle'{'' if major else TICK2}>{tick_label(v)}</text>")
    for v, kind in ticks(y0, y1):
        y = Y(v)
        major = kind == "major"
        add(f"<line x1='{LEFT}' y1='{y:.1f}' x2='{LEFT + PW}' y2='{y:.1f}' stroke='{'#ccc' if major else '#eee'}' stroke-width='1'/>")
        add(f"<line x1='{LEFT - (6 if major else 3)}' y1='{y:.1f}' x2='{LEFT}' y2='{y:.1f}' stroke='#333'/>")
        if kind != "minor":
            add(f"<text x='{LEFT - 9}' y='{y + 4:.1f}' text-anchor='end'{'' if major else TICK2}>{tick_label(v)}</text>")
    add(f"<rect x='{LEFT}' y='{TOP}' width='{PW}' height='{PH}' fill='none' stroke='#333'/>")
    add(f"<text x='{LEFT + PW / 2:.0f}' y='{H - 14}' text-anchor='middle' font-size='13'>arithmetic intensity (FLOP per KV-cache byte)</text>")
    add(f"<text transform='translate(20,{TOP + PH / 2:.0f}) rotate(-90)' text-anchor='middle' font-size='13'>GFLOP/s</text>")

    # The roof: bandwidth line up to the ridge, FMA peak after it.
    xa, xb = 10.0**x0, 10.0**x1
    g = ["<g clip-path='url(#plot)'>"]
    if fma > 0:
        g.append(f"<polyline points='{X(xa):.1f},{Y(bw * xa):.1f} {X(ridge):.1f},{Y(fma):.1f} {X(xb):.1f},{Y(fma):.1f}' fill='none' stroke='#111' stroke-width='2.2'/>")
        g.append(f"<line x1='{X(ridge):.1f}' y1='{Y(fma):.1f}' x2='{X(xb):.1f}' y2='{Y(bw * xb):.1f}' stroke='#111' stroke-width='1' stroke-dasharray='4,4' opacity='0.5'/>")
        g.append(f"<line x1='{X(xa):.1f}' y1='{Y(fma):.1f}' x2='{X(ridge):.1f}' y2='{Y(fma):.1f}' stroke='#111' stroke-width='1' stroke-dasharray='4,4' opacity='0.5'/>")
    else:
        g.append(f"<line x1='{X(xa):.1f}' y1='{Y(bw * xa):.1f}' x2='{X(xb):.1f}' y2='{Y(bw * xb):.1f}' stroke='#111' stroke-width='2.2'/>")
    g.append("</g>")
    out.extend(g)
    if fma > 0:
        add(f"<text x='{X(xb) - 6:.1f}' y='{Y(fma) - 7:.1f}' text-anchor='end' font-size='12' font-weight='bold'>{roof_label} {fmt_num(fma)} GFLOP/s</text>")
        add(f"<text x='{X(ridge) + 5:.1f}' y='{Y(fma) + 14:.1f}' text-anchor='start' font-size='10' fill='#555'>ridge {fmt_num(ridge)} FLOP/B</text>")
    # Bandwidth label along the slope, placed where the line is inside the plot.
    xl = max(xa * 1.5, (10.0**y0) / bw * 3)
    if ridge is None or xl < ridge / 1.5:
        ang = -math.degrees(math.atan2(Y(bw * xa) - Y(bw * xb), X(xb) - X(xa)))
        add(f"<text transform='translate({X(xl):.1f},{Y(bw * xl) - 7:.1f}) rotate({ang:.1f})' font-size='12' font-weight='bold'>DRAM read {fmt_num(bw)} GB/s</text>")

    # Points: scalar (hollow) first, joined to the kernel's marker.
    colors = dict(FORMAT_COLORS)
    for p in points:
        if p["kv_format"] not in colors:
            colors[p["kv_format"]] = FALLBACK_COLORS[len(colors) % len(FALLBACK_COLORS)]

    def describe(p, which, gf):
        topk = "dense" if p.get("topk") is None else f"topk {p['topk']}"
        s = (f"{which}: batch {p['batch']}, N {p['seqlen']}, h_q {p['h_q']}, s_q {p['s_q']}, "
             f"{p['kv_format']}, {topk}: {gf:.1f} GFLOP/s, {p['intensity']:.1f} FLOP/B")
        if which != "scalar":
            s += f", {p['seconds'] * 1e3:.3f} ms, {p.get('bound', '')} {100 * p.get('fraction_of_ceiling', 0):.1f}%"
            if p.get("speedup"):
                s += f", {p['speedup']:.2f}x scalar"
        else:
            s += f", {p['scalar_seconds'] * 1e3:.3f} ms"
        return s

    many = len(points) > 40
    r = 3.6 if many else 5.0
    # Where dense and sparse points share an intensity, dodge them apart by
    # a few pixels (dense left, sparse right) so the two columns stay legible.
    kinds = {}
    for p in points:
        kinds.setdefault(round(p["intensity"], 2), set()).add(p.get("topk") is None)
    dodged = any(len(k) > 1 for k in kinds.values())

    def PX(p):
        x = X(p["intensity"])
        if len(kinds[round(p["intensity"], 2)]) > 1:
            x += -r if p.get("topk") is None else r
        return x

    for p in points:
        sg = p.get("scalar_gflops")
        if sg:
            x = PX(p)
            add(f"<line x1='{x:.1f}' y1='{Y(sg):.1f}' x2='{x:.1f}' y2='{Y(p['gflops']):.1f}' stroke='{colors[p['kv_format']]}' stroke-width='0.8' opacity='0.35'/>")
    for p in points:
        sg = p.get("scalar_gflops")
        if sg:
            shape = "circle" if p.get("topk") is None else "triangle"
            add(marker(shape, PX(p), Y(sg), r * 0.9, colors[p["kv_format"]], False, describe(p, "scalar", sg)))
    for p in points:
        shape = "circle" if p.get("topk") is None else "triangle"
        add(marker(shape, PX(p), Y(p["gflops"]), r, colors[p["kv_format"]], True, describe(p, doc.get("cpu_isa", "kernel"), p["gflops"])))

    # Labels h_q/N/b (and s_q when > 1), placed greedily without overlaps;
    # a label that finds no free place is left out (the tooltip remains).
    boxes = []
    for p in points:
        boxes.append((PX(p) - r, Y(p["gflops"]) - r, PX(p) + r, Y(p["gflops"]) + r))
    placed = 0
    font = 8.5 if many else 9.5
    candidates = points
    if many:
        # Only the top and bottom of each column, which bound its spread.
        cols = {}
        for p in points:
            cols.setdefault((round(p["intensity"], 2), p["kv_format"], p.get("topk") is None), []).append(p)
        candidates = []
        for c in cols.values():
            c = sorted(c, key=lambda p: p["gflops"])
            candidates += [c[-1]] + ([c[0]] if len(c) > 1 else [])
    order = sorted(candidates, key=lambda p: -p["gflops"])
    for p in order:
        text = f"{p['h_q']}/{short_n(p['seqlen'])}/b{p['batch']}" + (f"/s{p['s_q']}" if p["s_q"] > 1 else "")
        tw, th = len(text) * font * 0.56, font
        x, y = PX(p), Y(p["gflops"])
        for dx, dy, anchor in ((r + 2, th / 2 - 1, "start"), (-r - 2, th / 2 - 1, "end"),
                               (0, -r - 3, "middle"), (0, r + th + 1, "middle"),
                               (r + 2, -r - 1, "start"), (r + 2, r + th - 1, "start"),
                               (-r - 2, -r - 1, "end"), (-r - 2, r + th - 1, "end")):
            lx = {"start": x + dx, "end": x + dx - tw, "middle": x - tw / 2}[anchor]
            box = (lx, y + dy - th, lx + tw, y + dy + 1)
            inside = box[0] >= LEFT + 2 and box[2] <= LEFT + PW - 2 and box[1] >= TOP + 2 and box[3] <= TOP + PH - 2
            if inside and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                boxes.append(box)
                add(f"<text x='{x + dx:.1f}' y='{y + dy:.1f}' text-anchor='{anchor}' font-size='{font}' fill='#333'>{escape(text)}</text>")
                placed += 1
                break

    # Legend.
    lx, ly = LEFT + PW + 16, TOP + 8
    add(f"<text x='{lx}' y='{ly + 4}' font-weight='bold'>KV format</text>")
    ly += 20
    for name in [n for n in colors if any(p["kv_format"] == n for p in points)]:
        add(marker("circle", lx + 6, ly, 5, colors[name], True, ""))
        add(f"<text x='{lx + 18}' y='{ly + 4}'>{escape(name)}</text>")
        ly += 18
    ly += 8
    add(f"<text x='{lx}' y='{ly + 4}' font-weight='bold'>keys</text>")
    ly += 20
    for shape, name in (("circle", "dense"), ("triangle", "sparse (topk)")):
        add(marker(shape, lx + 6, ly, 5, "#555", True, ""))
        add(f"<text x='{lx + 18}' y='{ly + 4}'>{name}</text>")
        ly += 18
    ly += 8
    add(f"<text x='{lx}' y='{ly + 4}' font-weight='bold'>kernel</text>")
    ly += 20
    add(marker("circle", lx + 6, ly, 5, "#555", True, ""))
    add(f"<text x='{lx + 18}' y='{ly + 4}'>{escape(doc.get('cpu_isa', 'kernel'))}</text>")
    ly += 18
    if any(p.get("scalar_gflops") for p in points):
        add(marker("circle", lx + 6, ly, 4.5, "#555", False, ""))
        add(f"<text x='{lx + 18}' y='{ly + 4}'>scalar reference</text>")
        ly += 18
    ly += 8
    add(f"<text x='{lx}' y='{ly + 4}' font-weight='bold'>ceilings (used)</text>")
    ly += 18
    lines = []
    if fma > 0:
        lines.append(f"{roof_name} {fmt_num(fma)} GFLOP/s")
    lines.append(f"DRAM {fmt_num(bw)} GB/s")
    if before and after:
        lines.append("before / after:")
        if fma > 0:
            lines.append(f"  FMA {fmt_num(before['fma_gflops'])} / {fmt_num(after['fma_gflops'])}")
        lines.append(f"  DRAM {fmt_num(before['read_gbytes_per_s'])} / {fmt_num(after['read_gbytes_per_s'])}")
    for t in lines:
        add(f"<text x='{lx}' y='{ly + 4}' font-size='11' xml:space='preserve'>{escape(t)}</text>")
        ly += 15
    ly += 10
    add(f"<text x='{lx}' y='{ly + 4}' font-weight='bold'>labels</text>")
    ly += 17
    notes = ["h_q / N / batch", "(/s2: s_q = 2)", f"{placed} of {len(points)} labelled" + (" (column ends)" if many else "")]
    if dodged:
        notes.append(f"dense/sparse dodged \u00b1{r:.0f} px")
    for t in notes:
        add(f"<text x='{lx}' y='{ly + 4}' font-size='11'>{escape(t)}</text>")
        ly += 15
    speedups = [p["speedup"] for p in points if p.get("speedup")]
    if speedups:
        geo = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        ly += 10
        add(f"<text x='{lx}' y='{ly + 4}' font-weight='bold'>x scalar</text>")
        ly += 17
        add(f"<text x='{lx}' y='{ly + 4}' font-size='11'>geomean {geo:.2f}x</text>")
        ly += 15
        add(f"<text x='{lx}' y='{ly + 4}' font-size='11'>range {min(speedups):.2f}x \u2013 {max(speedups):.2f}x</text>")

    add("</svg>")
    with open(argv[2], "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {argv[2]}: {len(points)} points, {placed} labelled")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
