"""A stand-in for `python -m sglang.launch_server`: same flags, endpoints and response shapes.

Run as `python -m tests.support.sglang_fake --model-path DIR --host 127.0.0.1 --port P --tp-size N`.
The "model" is a deterministic function of (weights, context): the folder's config.json gives
`architectures` and `vocab_size`, and `fake_weights.json` gives an integer `shift` that changes
every logit, so new weights change the tokens. Reference functions (`fake_logits`,
`reference_greedy`) let tests compute the expected output independently of the HTTP path.

Faithful where the engine depends on it:
  * /generate takes `input_ids` (one list or a batch), `sampling_params` (dict or list), and
    `return_logprob`; returns `output_ids` and `meta_info` with `output_token_logprobs` as
    [logprob, token_id, null] triples, `finish_reason` {"type": "stop"|"length"|"abort", ...} and
    `weight_version` (a string: `--weight-version` at launch, "default" without it, then the last update's).
  * GET /model_info (and the older /get_model_info): model_path, weight_version, architectures.
  * /pause_generation {"mode": "abort"|"retract"|"in_place"}: with "abort" running requests end
    with finish_reason abort; otherwise they wait; new requests wait until /continue_generation.
  * /update_weights_from_disk {"model_path", "weight_version"}: loading a checkpoint of another
    architecture kills the process, as real SGLang does.
  * `--enable-return-routed-experts` and the request field `return_routed_experts`: for an MoE
    config.json (num_hidden_layers, num_experts_per_tok, num_experts) the answer carries
    `meta_info.routed_experts` in SGLang's wire format (base64 int32 [P + T - 1, layers, top_k],
    see ace/rollout/sglang_routing.py) with the ids of `fake_routing`; without the launch flag the
    field is absent, as in SGLang.
  * GET /fake/events lists the control calls in order (a test hook real SGLang does not have).
"""
from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import struct
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def load_model(model_path: str | os.PathLike) -> dict:
    cfg = json.loads(Path(model_path, "config.json").read_text())
    weights_file = Path(model_path, "fake_weights.json")
    shift = json.loads(weights_file.read_text())["shift"] if weights_file.exists() else 0
    moe = None
    if cfg.get("num_experts"):
        moe = {"num_layers": int(cfg["num_hidden_layers"]), "top_k": int(cfg["num_experts_per_tok"]),
               "num_experts": int(cfg["num_experts"])}
    return {"architectures": cfg["architectures"], "vocab_size": int(cfg.get("vocab_size", 32)),
            "shift": int(shift), "path": str(model_path), "moe": moe}


def fake_routing(seq: list[int], *, num_layers: int, top_k: int, num_experts: int) -> list[list[list[int]]]:
    """[len(seq) - 1, num_layers, top_k] expert ids, SGLang's row layout: one row per position the
    model ran on (every token but the last), top_k distinct ids per layer from a fixed hash."""
    rows = []
    for pos, tok in enumerate(seq[:-1]):
        starts = [(tok * 31 + pos * 7 + layer * 13) % num_experts for layer in range(num_layers)]
        rows.append([[(s + j) % num_experts for j in range(top_k)] for s in starts])
    return rows


def encode_routing(rows: list[list[list[int]]]) -> str:
    """SGLang's encoding of routed experts: base64 of the raw little-endian int32 bytes."""
    flat = [i for row in rows for layer in row for i in layer]
    return base64.b64encode(struct.pack(f"<{len(flat)}i", *flat)).decode("ascii")


def fake_logits(context: list[int], *, shift: int, vocab_size: int) -> list[float]:
    """[V] logits of the next token after `context`; a fixed integer hash, not a real model."""
    last = context[-1] if context else 0
    return [((last * 1000003 + v * 7919 + shift * 104729 + len(context) * 31) % 9973) / 1000.0
            for v in range(vocab_size)]


def log_softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def reference_greedy(prompt: list[int], *, shift: int, vocab_size: int, max_new_tokens: int,
                     stop_token_ids: tuple[int, ...] = ()) -> tuple[list[int], list[float]]:
    """Greedy tokens and their temperature-1 logprobs, computed without any server."""
    ctx, out, lps = list(prompt), [], []
    for _ in range(max_new_tokens):
        lp = log_softmax(fake_logits(ctx, shift=shift, vocab_size=vocab_size))
        tok = max(range(vocab_size), key=lambda v: lp[v])
        out.append(tok)
        lps.append(lp[tok])
        ctx.append(tok)
        if tok in stop_token_ids:
            break
    return out, lps


class FakeSGLang:
    def __init__(self, model_path: str, token_s: float, weight_version: str = "default",
                 return_routing: bool = False):
        self.model = load_model(model_path)
        self.return_routing = return_routing  # --enable-return-routed-experts
        self.version = weight_version
        self.token_s = token_s
        self.cond = threading.Condition()
        self.paused = False
        self.pause_mode = None
        self.events: list[dict] = []
        self.lock = threading.Lock()

    def log(self, **event):
        with self.lock:
            self.events.append(event)

    def _wait_unpaused(self):
        with self.cond:
            while self.paused:
                self.cond.wait()
            return dict(self.model), self.version

    def generate_one(self, prompt: list[int], sp: dict, routed_experts: bool = False) -> dict:
        model, version = self._wait_unpaused()
        temperature = float(sp.get("temperature", 1.0))
        top_k = int(sp.get("top_k", -1))
        max_new = int(sp.get("max_new_tokens", 128))
        stops = set(sp.get("stop_token_ids") or [])
        seed = sp.get("sampling_seed")
        rng = random.Random(seed) if seed is not None else random.Random()
        ctx, triples, reason = list(prompt), [], None
        for _ in range(max_new):
            if self.token_s:
                time.sleep(self.token_s)
            with self.cond:
                if self.paused and self.pause_mode == "abort":
                    reason = {"type": "abort", "message": "Abort by pause_generation"}
                    break
                while self.paused:  # "retract" / "in_place": hold the request until continued
                    self.cond.wait()
            logits = fake_logits(ctx, shift=model["shift"], vocab_size=model["vocab_size"])
            if temperature == 0:
                tok = max(range(len(logits)), key=lambda v: logits[v])
                lp = log_softmax(logits)[tok]
            else:
                scaled = [x / temperature for x in logits]
                if top_k > 0:
                    kth = sorted(scaled, reverse=True)[top_k - 1]
                    scaled = [x if x >= kth else -math.inf for x in scaled]
                lps = log_softmax(scaled)
                tok = rng.choices(range(len(lps)), weights=[math.exp(x) for x in lps])[0]
                lp = lps[tok]
            triples.append([lp, tok, None])
            ctx.append(tok)
            if tok in stops:
                reason = {"type": "stop", "matched": tok}
                break
        if reason is None:
            reason = {"type": "length", "length": len(triples)}
        self.log(event="generate", weight_version=version, finish_reason=reason["type"])
        meta = {"id": uuid.uuid4().hex, "finish_reason": reason, "prompt_tokens": len(prompt),
                "completion_tokens": len(triples), "output_token_logprobs": triples, "weight_version": version}
        if routed_experts and self.return_routing and model["moe"]:
            meta["routed_experts"] = encode_routing(fake_routing(ctx, **model["moe"]))
        return {"text": "", "output_ids": [t[1] for t in triples], "meta_info": meta}

    def update_weights(self, body: dict) -> tuple[int, dict]:
        path = body.get("model_path")
        try:
            new = load_model(path)
        except (OSError, KeyError, TypeError, ValueError) as e:
            return 400, {"success": False, "message": f"Failed to load {path}: {e}"}
        if new["architectures"] != self.model["architectures"]:
            print(f"fatal: cannot load {new['architectures']} weights into {self.model['architectures']}",
                  flush=True)
            os._exit(1)
        with self.cond:
            self.model = new
            if body.get("weight_version") is not None:
                self.version = str(body["weight_version"])
        self.log(event="update_weights_from_disk", model_path=path, weight_version=self.version,
                 paused=self.paused)
        return 200, {"success": True, "message": "Succeeded to update model weights.",
                     "num_paused_requests": 0}


def make_handler(state: FakeSGLang):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            pass

        def _send(self, code: int, obj):
            data = (json.dumps(obj) if not isinstance(obj, str) else obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json" if not isinstance(obj, str) else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}") if n else {}

        def do_GET(self):
            if self.path in ("/health", "/health_generate"):
                self._send(200, "")
            elif self.path in ("/get_model_info", "/model_info"):
                self._send(200, {"model_path": state.model["path"], "is_generation": True,
                                 "weight_version": state.version, "architectures": state.model["architectures"]})
            elif self.path == "/fake/events":
                with state.lock:
                    self._send(200, list(state.events))
            elif self.path == "/flush_cache":
                self._flush()
            else:
                self._send(404, {"error": f"no route {self.path}"})

        def _flush(self):
            state.log(event="flush_cache", paused=state.paused)
            self._send(200, "Cache flushed.\nPlease check backend logs for more details.")

        def do_POST(self):
            body = self._body()
            if self.path == "/generate":
                ids = body.get("input_ids")
                if not body.get("return_logprob"):
                    # Real SGLang would answer without logprobs; the engine must always ask.
                    self._send(400, {"error": "this stand-in requires return_logprob=true"})
                    return
                batched = bool(ids) and isinstance(ids[0], list)
                prompts = ids if batched else [ids]
                sps = body.get("sampling_params") or {}
                sps = sps if isinstance(sps, list) else [sps] * len(prompts)
                if len(sps) != len(prompts):
                    self._send(400, {"error": f"{len(prompts)} prompts, {len(sps)} sampling_params"})
                    return
                routed = body.get("return_routed_experts", False)
                if not isinstance(routed, bool):
                    # SGLang's request model takes one bool for the whole batch.
                    self._send(400, {"error": f"return_routed_experts must be a bool, got {routed!r}"})
                    return
                out = [state.generate_one(p, sp, routed) for p, sp in zip(prompts, sps)]
                self._send(200, out if batched else out[0])
            elif self.path == "/update_weights_from_disk":
                self._send(*state.update_weights(body))
            elif self.path == "/pause_generation":
                with state.cond:
                    state.paused, state.pause_mode = True, body.get("mode", "abort")
                state.log(event="pause_generation", mode=state.pause_mode)
                self._send(200, {"message": "Generation paused successfully."})
            elif self.path == "/continue_generation":
                with state.cond:
                    state.paused = False
                    state.cond.notify_all()
                state.log(event="continue_generation")
                self._send(200, {"message": "Generation continued successfully."})
            elif self.path == "/flush_cache":
                self._flush()
            else:
                self._send(404, {"error": f"no route {self.path}"})

    return Handler


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--weight-version", default="default")
    ap.add_argument("--fake-startup-s", type=float, default=0.0, help="delay before serving /health")
    ap.add_argument("--fake-token-s", type=float, default=0.0, help="time per generated token")
    ap.add_argument("--fake-exit-at-start", action="store_true", help="die before serving")
    ap.add_argument("--enable-return-routed-experts", action="store_true")
    args, unknown = ap.parse_known_args(argv)
    print(f"fake sglang: model {args.model_path} tp {args.tp_size} port {args.port}; "
          f"ignored flags {unknown}", flush=True)
    if args.fake_exit_at_start:
        print("fatal: simulated start-up failure (out of memory for KV cache)", flush=True)
        sys.exit(3)
    state = FakeSGLang(args.model_path, args.fake_token_s, args.weight_version,
                       return_routing=args.enable_return_routed_experts)
    time.sleep(args.fake_startup_s)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    server.daemon_threads = True
    print("The server is fired up and ready to roll!", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
