"""``report.html`` of a reconstruction: one self-contained page that works offline (file://).

The page inlines NGL (``static/ngl.js``, MIT) and a multi-model PDB of the structures along the
CV; a slider walks along the CV, shows the structure there (``/k`` model selection in NGL), its
CV value and population, and moves a marker on the density and free-energy plots (inline SVG
drawn from the data; click a plot to jump). The page exposes ``window.cryosipViewer``
(``frame``, ``nFrames``, ``ready``, ``error``, ``setFrame(i)``) for scripted checks. A fit-check
section shows ``summary["fit_check"]`` (``ok``, ``warnings``, ``statistics``) and
``fit_check.png`` when present, and says "not run" otherwise. Static figures are inlined as PNG.
"""

from __future__ import annotations

import base64
import html
import json
import os
from importlib import resources

import numpy as np

from .._atomic import json_safe, write_text

__all__ = ["write_interactive_report", "ngl_source"]


def ngl_source() -> str:
    """The bundled NGL viewer (``cryosip/analysis/static/ngl.js``)."""
    return resources.files("cryosip.analysis").joinpath("static/ngl.js").read_text("utf-8")


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.5em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 9px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
#viewer{width:600px;height:450px;border:1px solid #ccc;position:relative}
.controls{margin:.5em 0;font-size:1.05em}.controls input{width:600px}
#cvlabel{font-weight:600;display:block;margin-top:.3em}
.plots svg{display:block;margin-bottom:8px;background:#fff;border:1px solid #eee}
.ok{background:#eefbea;border-left:4px solid #3a3;padding:.5em 1em}
.bad{background:#fdecea;border-left:4px solid #c33;padding:.5em 1em}
.warn{color:#a00;font-weight:600}.muted{color:#666}
.notrun{background:#f4f4f4;border-left:4px solid #999;padding:.5em 1em}
img{max-width:100%;border:1px solid #eee}figure{margin:.8em 0}figcaption{font-size:.85em;color:#555}
code{background:#f4f4f4;padding:1px 4px}#viewer-msg{color:#a00}"""

JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("cryosip-data").textContent);
  var n = D.frames.length;
  var state = { frame: D.start, nFrames: n, ready: false, error: null, setFrame: null };
  window.cryosipViewer = state;
  var slider = document.getElementById("cvslider");
  var label = document.getElementById("cvlabel");
  var rep = null;
  var SVGNS = "http://www.w3.org/2000/svg";

  function el(tag, attrs, parent) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function fmt(v) { return (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0)) ? v.toExponential(2) : v.toPrecision(3); }

  var plots = [];
  function plot(id, curve) {
    var svg = document.getElementById(id);
    if (!svg || !curve) return;
    var W = 440, H = 200, L = 50, R = 10, T = 22, B = 34;
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("width", W); svg.setAttribute("height", H);
    var x = curve.x, ys = [curve.y].concat(curve.lo ? [curve.lo, curve.hi] : []);
    var xmin = D.xrange[0], xmax = D.xrange[1];
    var ymin = Infinity, ymax = -Infinity;
    ys.forEach(function (a) { a.forEach(function (v) { if (isFinite(v)) { ymin = Math.min(ymin, v); ymax = Math.max(ymax, v); } }); });
    if (curve.ymax !== undefined && ymax > curve.ymax) ymax = curve.ymax;
    if (curve.ymin !== undefined) ymin = Math.min(ymin, curve.ymin);
    if (!(ymax > ymin)) { ymax = ymin + 1; }
    var sx = function (v) { return L + (v - xmin) / (xmax - xmin) * (W - L - R); };
    var sy = function (v) { return H - B - (Math.min(v, ymax) - ymin) / (ymax - ymin) * (H - T - B); };
    el("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#999" }, svg);
    if (curve.lo) {
      var p = "";
      for (var i = 0; i < x.length; i++) p += (i ? "L" : "M") + sx(x[i]).toFixed(1) + "," + sy(curve.hi[i]).toFixed(1);
      for (var j = x.length - 1; j >= 0; j--) p += "L" + sx(x[j]).toFixed(1) + "," + sy(curve.lo[j]).toFixed(1);
      el("path", { d: p + "Z", fill: curve.color, "fill-opacity": 0.2, stroke: "none" }, svg);
    }
    var d = "";
    for (var k = 0; k < x.length; k++) d += (k ? "L" : "M") + sx(x[k]).toFixed(1) + "," + sy(curve.y[k]).toFixed(1);
    el("path", { d: d, fill: "none", stroke: curve.color, "stroke-width": 2 }, svg);
    [xmin, 0.5 * (xmin + xmax), xmax].forEach(function (v) {
      var t = el("text", { x: sx(v), y: H - B + 14, "font-size": 11, "text-anchor": "middle" }, svg); t.textContent = fmt(v);
    });
    [ymin, ymax].forEach(function (v) {
      var t = el("text", { x: L - 4, y: sy(v) + 4, "font-size": 11, "text-anchor": "end" }, svg); t.textContent = fmt(v);
    });
    var xl = el("text", { x: L + (W - L - R) / 2, y: H - 4, "font-size": 12, "text-anchor": "middle" }, svg); xl.textContent = D.xlabel;
    var yl = el("text", { x: L, y: 14, "font-size": 12 }, svg); yl.textContent = curve.ylabel;
    var marker = el("line", { y1: T, y2: H - B, stroke: "#d22", "stroke-width": 2, "class": "cv-marker" }, svg);
    svg.addEventListener("click", function (ev) {
      var r = svg.getBoundingClientRect();
      var v = xmin + ((ev.clientX - r.left) * W / r.width - L) / (W - L - R) * (xmax - xmin);
      var best = 0;
      for (var i = 0; i < n; i++) if (Math.abs(D.frames[i].t - v) < Math.abs(D.frames[best].t - v)) best = i;
      setFrame(best);
    });
    plots.push({ marker: marker, sx: sx });
  }

  function setFrame(i) {
    i = Math.max(0, Math.min(n - 1, Math.round(i)));
    state.frame = i;
    slider.value = i;
    var f = D.frames[i];
    label.textContent = f.text;
    plots.forEach(function (p) { var X = p.sx(f.t).toFixed(1); p.marker.setAttribute("x1", X); p.marker.setAttribute("x2", X); });
    if (rep) rep.setSelection("/" + i);
  }
  state.setFrame = setFrame;

  plot("densplot", D.density);
  plot("feplot", D.free_energy);
  slider.max = n - 1;
  slider.addEventListener("input", function () { setFrame(+slider.value); });
  setFrame(D.start);

  var msg = document.getElementById("viewer-msg");
  try {
    if (typeof NGL === "undefined") throw new Error("the NGL viewer script did not load");
    var stage = new NGL.Stage("viewer", { backgroundColor: "white", tooltip: false });
    state.stage = stage;
    var text = document.getElementById("frames-pdb").textContent;
    if (!text.trim()) throw new Error("no structures in this report (no conformation model)");
    stage.loadFile(new Blob([text], { type: "text/plain" }), { ext: "pdb", name: "cv-frames" }).then(function (comp) {
      rep = comp.addRepresentation(D.representation, { sele: "/" + state.frame, colorScheme: "residueindex", radiusScale: D.radiusScale });
      comp.autoView();
      state.ready = true;
    }).catch(function (e) {
      state.error = String(e);
      msg.textContent = "3-D viewer failed: " + state.error;
    });
    window.addEventListener("resize", function () { stage.handleResize(); });
  } catch (e) {
    state.error = String(e);
    msg.textContent = "3-D viewer unavailable (" + state.error + "); the plots and tables below still work.";
  }
})();
"""


def _img(path: str, caption: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return html.escape(str(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return html.escape(str(v))


def _table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>" for k, v in rows)
    return f"<table><tbody>{body}</tbody></table>"


def _fit_check_status(fit: dict | None) -> str:
    """The banner at the top of the page: passed / FAILED with the warnings, or not run."""
    if not fit:
        return (
            "<div class='notrun' id='fit-check-status'>Fit check: <b>not run</b> (no "
            "<code>fit_check</code> in summary.json).</div>"
        )
    ok = bool(fit.get("ok"))
    warnings = [str(w) for w in (fit.get("warnings") or [])]
    parts = [
        f"<div class='{'ok' if ok and not warnings else 'bad'}' id='fit-check-status'>Fit check: "
        f"<b>{'passed' if ok else 'FAILED'}</b>"
        + (f", {len(warnings)} warning{'s' if len(warnings) != 1 else ''}" if warnings else "")
        + " (details below)</div>"
    ]
    if warnings:
        parts.append(
            "<ul id='fit-check-warnings'>"
            + "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in warnings)
            + "</ul>"
        )
    return "\n".join(parts)


def _fit_check_details(fit: dict | None, png: str | None) -> str:
    if not fit:
        return "<p class='muted'>Fit check not run.</p>"
    parts = []
    stats = fit.get("statistics") or {}
    if stats:
        parts.append(_table(list(stats.items())))
    if png:
        parts.append(_img(png, "fit check"))
    return "\n".join(parts)


def _json_script(obj) -> str:
    text = json.dumps(json_safe(obj), allow_nan=False)
    return text.replace("</", "<\\/")


def write_interactive_report(
    path,
    *,
    title: str,
    summary: dict,
    frames_pdb: str,
    frames: list[dict],
    start: int,
    xlabel: str,
    xrange: tuple[float, float],
    density: dict | None,
    free_energy: dict | None,
    representation: str,
    radius_scale: float = 1.0,
    summary_rows: list[tuple[str, object]],
    ensemble_rows: list[tuple[str, object]] | None = None,
    figures: list[tuple[str, str]] = (),
    files: list[tuple[str, str]] = (),
    fit_check_png: str | None = None,
    notes: list[str] = (),
) -> None:
    """Write the page. ``frames``: one dict per viewer frame with ``t`` (x position on the plots)
    and ``text`` (the label under the slider); ``density``/``free_energy``: ``{"x", "y", "lo",
    "hi", "ylabel", "color"}`` curves over ``xrange``; ``frames_pdb``: multi-model PDB text."""
    if "</script" in frames_pdb.lower():
        raise ValueError("PDB text cannot contain '</script'")
    data = {
        "frames": frames,
        "start": int(start),
        "xlabel": xlabel,
        "xrange": [float(xrange[0]), float(xrange[1])],
        "density": density,
        "free_energy": free_energy,
        "representation": representation,
        "radiusScale": float(radius_scale),
    }
    fit = summary.get("fit_check")
    ens = ""
    if ensemble_rows:
        ens = (
            "<h3>Weighted ensemble (ensemble.pdb / ensemble.cif)</h3><table><thead><tr><th>model</th>"
            "<th>CV</th><th>population</th></tr></thead><tbody>"
            + "".join(
                f"<tr><td>{i + 1}</td><td>{html.escape(str(cv))}</td><td>{float(p):.4f}</td></tr>"
                for i, (cv, p) in enumerate(ensemble_rows)
            )
            + "</tbody></table>"
        )
    body = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style>",
        "<script>" + ngl_source() + "</script>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _fit_check_status(fit),
        "<h2>Structures along the CV</h2>",
        "<p class='muted'>Drag the slider (or click a plot) to walk along the CV; the structure, "
        "the marker on the plots and the label follow. Population: the recovered probability of "
        "the CV segment nearest to the frame.</p>",
        "<div class='row'><div><div id='viewer'></div><div class='controls'>"
        f"<input type='range' id='cvslider' min='0' max='{len(frames) - 1}' step='1' value='{int(start)}' "
        "aria-label='position along the CV'>"
        "<span id='cvlabel'></span><span id='viewer-msg'></span></div></div>",
        "<div class='plots'><svg id='densplot'></svg><svg id='feplot'></svg></div></div>",
        "<h2>Summary</h2>",
        _table(summary_rows),
        ens,
        "<h2>Fit check</h2>",
        _fit_check_details(fit, fit_check_png),
    ]
    for note in notes:
        body.append(f"<p class='muted'>{note}</p>")
    if figures:
        body.append("<h2>Figures</h2>")
        body += [_img(p, c) for p, c in figures if os.path.exists(p)]
    if files:
        body.append("<h2>Files in this folder</h2><table><tbody>")
        body += [
            f"<tr><td><code>{html.escape(f)}</code></td><td>{html.escape(d)}</td></tr>"
            for f, d in files
        ]
        body.append("</tbody></table>")
    body += [
        f"<script id='frames-pdb' type='text/plain'>{frames_pdb}</script>",
        f"<script id='cryosip-data' type='application/json'>{_json_script(data)}</script>",
        f"<script>{JS}</script>",
        "</body></html>",
    ]
    write_text(path, "\n".join(body))
