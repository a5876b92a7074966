"""report.html in a real browser (headless Chromium, file:// URL, no network): it loads without
console errors, the NGL viewer draws the structure, and the slider changes structure, label and
plot marker. The screenshots are kept under pytest's temp folder (report_*.png)."""

import io

import matplotlib.image as mpimg
import numpy as np
import pytest
from headless_browser import HeadlessPage, chromium_path
from reconstructed_runs import reconstructed_runs

VIEWER_RECT = (
    "(function(){var r=document.getElementById('viewer').getBoundingClientRect();"
    "return {x:r.left+scrollX,y:r.top+scrollY,width:r.width,height:r.height};})()"
)


def _slide(page, value: str) -> None:
    page.eval(
        "(function(){var s=document.getElementById('cvslider');s.value="
        + value
        + ";s.dispatchEvent(new Event('input'));})()"
    )
    page.pump(1.0)  # let NGL redraw


def _pixels(png: bytes) -> np.ndarray:
    return mpimg.imread(io.BytesIO(png), format="png")[..., :3]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return reconstructed_runs(tmp_path_factory)["star"] / "report.html"


def test_report_in_headless_chromium(report, tmp_path):
    assert chromium_path() is not None, "chromium is installed by `make sysdeps`"
    with HeadlessPage(timeout=90) as page:
        page.goto(report.resolve().as_uri())
        page.wait_for(
            "window.cryosipViewer && (window.cryosipViewer.ready || window.cryosipViewer.error)"
        )
        assert page.eval("window.cryosipViewer.error") is None
        n = page.eval("window.cryosipViewer.nFrames")
        assert n == 21 and 0 <= page.eval("window.cryosipViewer.frame") < n
        page.pump(1.5)
        (tmp_path / "report_page.png").write_bytes(page.screenshot())
        rect = page.eval(VIEWER_RECT)
        assert rect["width"] > 300 and rect["height"] > 300

        _slide(page, "0")
        first = page.screenshot(rect)
        label0 = page.eval("document.getElementById('cvlabel').textContent")
        marker0 = page.eval("document.querySelector('#densplot .cv-marker').getAttribute('x1')")
        _slide(page, "s.max")
        last = page.screenshot(rect)
        label1 = page.eval("document.getElementById('cvlabel').textContent")
        marker1 = page.eval("document.querySelector('#densplot .cv-marker').getAttribute('x1')")
        (tmp_path / "report_viewer_first.png").write_bytes(first)
        (tmp_path / "report_viewer_last.png").write_bytes(last)

        assert page.eval("window.cryosipViewer.frame") == n - 1
        assert label0 != label1 and "population" in label1
        assert float(marker1) > float(marker0)
        a, b = _pixels(first), _pixels(last)
        # the viewer shows a molecule: many non-background pixels of many colours
        for img in (a, b):
            drawn = np.abs(img - img[2, 2]).sum(-1) > 0.1
            assert 0.02 < drawn.mean() < 0.9, drawn.mean()
            assert len(np.unique((img[drawn] * 255).astype(np.uint8), axis=0)) > 50
        # and a different structure at the other end of the slider
        changed = np.abs(a - b).sum(-1) > 0.1
        assert changed.mean() > 0.01, changed.mean()
        errors = page.errors()
    assert errors == [], errors
