import json
import shutil
import subprocess

import pytest

from cryosip.cli.main import main

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def console_messages(html_path, tmp_path, screenshot=None) -> list[str]:
    """Open a page in headless Chromium (Debian's, installed by `make test`) and return its console lines."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, (
        "chromium is missing: `make test` installs Debian's chromium (see Makefile: sysdeps)"
    )
    extra = (
        [f"--screenshot={screenshot}", "--window-size=1100,2400"] if screenshot else ["--dump-dom"]
    )
    proc = subprocess.run(
        [
            exe,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            *extra,
            f"file://{html_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return [line for line in (proc.stderr + proc.stdout).splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert (
        main(
            [
                "demo",
                "--quick",
                "--n-images",
                "300",
                "--steps",
                "60",
                "--bootstrap",
                "1",
                "--box",
                "32",
                "--pixel-size",
                "4.0",
                "--snr",
                "0.05",
                "--n-particles",
                "32",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def test_demo_reduced_size_reports_w1(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert set(summary["w1"]) == {"wgf-kl", "wgf-mmd", "wgf-kl+mmd", "em-grid", "per-image"}
    assert summary["w1"]["wgf-kl"] < 0.06, summary["w1"]
    assert summary["w1"]["em-grid"] < 0.06, summary["w1"]
    html = (demo_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "per-image" in html
    assert len(list(demo_dir.glob("structure_s*.pdb"))) == 3


def test_report_opens_in_chromium_without_console_errors(demo_dir, tmp_path):
    # the check can fail: a page with an error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefined_function();</script></body></html>")
    assert any("Uncaught" in m for m in console_messages(bad, tmp_path))
    shot = tmp_path / "report.png"
    assert console_messages(demo_dir / "report.html", tmp_path, screenshot=shot) == []
    assert shot.stat().st_size > 50_000  # a rendered page with figures, not a blank one
