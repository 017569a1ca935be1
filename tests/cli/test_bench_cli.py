"""`rwkv-nvim bench` runs end to end on a tiny checkpoint and reports every figure."""
import json
import subprocess
import sys


def _bench(*args):
    out = subprocess.run([sys.executable, "-m", "rwkv_engine.cli", "bench", *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_bench_json_with_peer_and_replay(tiny_model_path, tmp_path):
    src = tmp_path / "typed.py"
    src.write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(12)))
    r = json.loads(_bench("--model", str(tiny_model_path), "--json", "--repeat", "1", "--decode-steps", "2",
                          "--prefill-tokens", "16", "--replay-file", str(src), "--replay-lines", "1"))
    for k in ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s"):
        assert r["engine"][k] > 0
        assert r["peer"][k] > 0 and r["speedup"][k] > 0
    ks = r["replay"]["keystroke"]
    assert ks["n"] >= 5 and ks["refed_tokens_max"] <= 8
    assert r["replay"]["cold"]["refed_tokens_p50"] > ks["refed_tokens_p50"]
    assert r["memory"]["peak_rss_mb"] > 0


def test_bench_table_without_peer(tiny_model_path):
    text = _bench("--model", str(tiny_model_path), "--no-peer", "--no-replay", "--repeat", "1",
                  "--decode-steps", "2", "--prefill-tokens", "16")
    assert "prefill_tok_s" in text and "peak RSS" in text
