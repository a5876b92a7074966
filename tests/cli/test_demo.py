import json

from cryosip.cli.main import main


def test_demo_reduced_size_reports_w1(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--n-images", "300", "--steps", "60", "--bootstrap", "1", "--box", "32",
                 "--pixel-size", "4.0", "--snr", "0.05", "--n-particles", "32", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["w1"]) == {"wgf-kl", "wgf-mmd", "wgf-kl+mmd", "em-grid", "per-image"}
    assert summary["w1"]["wgf-kl"] < 0.06, summary["w1"]
    assert summary["w1"]["em-grid"] < 0.06, summary["w1"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "per-image" in html
    assert len(list(out.glob("structure_s*.pdb"))) == 3
