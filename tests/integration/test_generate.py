"""Text generation over HTTP: /v1/completions (OpenAI), /v1/models, Triton's
generate and generate_stream, tokenize and detokenize, on small random
transformers with the byte tokenizer and with GPT-2's real BPE files.

What is checked: greedy text is the same alone and while other streams
decode (continuous batching never changes a result); a seed reproduces a
sampled text; streamed deltas add up to the whole answer and end with
[DONE]; stop strings cut the text before their first occurrence; n choices;
logprobs; echo + logprobs + max_tokens 0 scores the prompt exactly as the
transformer kind's token_logprobs; every 400 of the contract in OpenAI's
error shape; a client that leaves mid-stream ends its sequence."""
import http.client
import json
import os
import shutil
import socket
import sys
import threading
import time

from harness import (Daemon, SkipTest, check, check_status, collect, make_repo, output,
                     run_tests, tensor, write_model)

try:
    import make_tiny_gpt2
    HAVE_GEN = True
except ImportError as e:  # pragma: no cover
    HAVE_GEN = False
    IMPORT_ERROR = e

HERE = os.path.dirname(os.path.abspath(__file__))
GPT2 = os.path.join(HERE, "..", "data", "gpt2")
MLP = {"layers.0.weight": ("F32", [1, 2], [1, -1]), "layers.0.bias": ("F32", [1], [0.5])}


def add_to_config(path, **kv):
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(kv)
    with open(path, "w") as f:
        json.dump(cfg, f)


class Ctx:
    def __init__(self):
        self.repo = make_repo()
        r = self.repo
        make_tiny_gpt2.make(os.path.join(r, "bytes"), n_layer=2, n_head=2, n_embd=32,
                            vocab_size=256, n_positions=4096, positions="rope", attention="lssar",
                            seed=3)
        add_to_config(os.path.join(r, "bytes", "config.json"), tokenizer="bytes")
        make_tiny_gpt2.make(os.path.join(r, "short"), n_layer=1, n_head=2, n_embd=16,
                            vocab_size=256, n_positions=64, positions="learned",
                            attention="softmax", seed=4)
        add_to_config(os.path.join(r, "short", "config.json"), tokenizer="bytes")
        make_tiny_gpt2.make(os.path.join(r, "bpe"), n_layer=1, n_head=2, n_embd=16,
                            vocab_size=50257, n_positions=4096, positions="rope",
                            attention="softmax", seed=5)
        for name in ("encoder.json", "vocab.bpe"):
            shutil.copyfile(os.path.join(GPT2, name), os.path.join(r, "bpe", name))
        write_model(r, "mlp", {"kind": "mlp", "activations": ["none"]}, MLP)
        # vocabulary files that are no byte-level BPE (no token for most bytes):
        # found beside the weights they leave the model scoring ids; named in
        # config.json they keep it from loading
        for name, named in (("oddvocab", False), ("oddvocab_named", True)):
            make_tiny_gpt2.make(os.path.join(r, name), vocab_size=40, seed=6)
            with open(os.path.join(r, name, "vocab.json"), "w") as f:
                json.dump({chr(65 + i): i for i in range(40)}, f)
            with open(os.path.join(r, name, "merges.txt"), "w") as f:
                f.write("#version: 0.2\n")
            if named:
                add_to_config(os.path.join(r, name, "config.json"), tokenizer="bpe")
        self.d = Daemon(r, ["--threads", "2"]).start(wait_ready=False)
        deadline = time.time() + 30
        while time.time() < deadline and self.d.get("/v2/models/mlp/ready").status != 200:
            time.sleep(0.05)

    def daemon_logs(self):
        return self.d.logs()


def setup():
    if not HAVE_GEN:
        raise SkipTest("the model generator is missing (%s)" % IMPORT_ERROR)
    return Ctx()


def teardown(ctx):
    if ctx is not None:
        ctx.d.stop()
        shutil.rmtree(ctx.repo, ignore_errors=True)


def complete(d, **body):
    return d.post("/v1/completions", body, timeout=120)


def ok(d, **body):
    return check_status(complete(d, **body), 200).json()


def stream_events(d, path, body, stop_after=None):
    """POSTs body and reads the server-sent events; returns (events, raw lines).
    stop_after: close the connection after that many events."""
    c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        check(False, "status %d: %s" % (r.status, r.read()[:300]))
    check(r.getheader("Content-Type") == "text/event-stream", r.getheader("Content-Type"))
    events, done = [], False
    while True:
        line = r.readline()
        if not line:
            break
        line = line.decode("utf-8").rstrip("\n")
        if not line:
            continue
        check(line.startswith("data: "), "not an SSE data line: %r" % line)
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        check(not done, "an event after [DONE]")
        events.append(json.loads(data))
        if stop_after is not None and len(events) >= stop_after:
            c.sock.shutdown(socket.SHUT_RDWR)
            c.close()
            return events, False
    c.close()
    return events, done


def openai_error(r, status, param=None, contains=None):
    check(r.status == status, "status %d, expected %d: %s" % (r.status, status, r.body[:300]))
    e = r.json()["error"]
    check(set(e) == {"message", "type", "param", "code"}, e)
    check(e["type"] == ("invalid_request_error" if status in (400, 404) else e["type"]), e)
    if param is not None:
        check(e["param"] == param, "param %r, expected %r" % (e["param"], param))
    if contains:
        check(contains in e["message"], "%r not in %r" % (contains, e["message"]))


# ---------------------------------------------------------------- tokenizers

def test_tokenize_round_trip(c):
    d = c.d
    j = check_status(d.post("/v2/models/bytes/tokenize", {"text": "héllo"}), 200).json()
    check(j["tokens"] == [104, 195, 169, 108, 108, 111], j)
    j = check_status(d.post("/v2/models/bytes/detokenize", {"tokens": j["tokens"]}), 200).json()
    check(j["text"] == "héllo", j)
    # a byte that forms no character comes back as U+FFFD
    j = check_status(d.post("/v2/models/bytes/detokenize", {"tokens": [104, 255]}), 200).json()
    check(j["text"] == "h\ufffd", j)
    # GPT-2's real vocabulary and merges
    j = check_status(d.post("/v2/models/bpe/tokenize", {"text": "Hello world!"}), 200).json()
    check(j["tokens"] == [15496, 995, 0], j)
    text = "Café 日本 😀 it's 2026<|endoftext|>"
    j = check_status(d.post("/v2/models/bpe/tokenize", {"text": text}), 200).json()
    check(j["tokens"][-1] == 50256, j)
    back = check_status(d.post("/v2/models/bpe/detokenize", {"tokens": j["tokens"]}), 200).json()
    check(back["text"] == text, back)
    check_status(d.post("/v2/models/bpe/detokenize", {"tokens": [50257]}), 400, "50257")
    check_status(d.post("/v2/models/bpe/tokenize", {"text": "x", "extra": 1}), 400, "extra")
    check_status(d.post("/v2/models/mlp/tokenize", {"text": "x"}), 400, "no tokenizer")
    check_status(d.post("/v2/models/nope/tokenize", {"text": "x"}), 404)


def test_tokenizer_files_that_cannot_serve(c):
    d = c.d
    r = check_status(d.infer("oddvocab", [tensor("input_ids", [[1, 2, 3]], datatype="INT64")]), 200)
    check(len(output(r, "token_logprobs")["data"]) == 2, r)
    check_status(d.post("/v2/models/oddvocab/tokenize", {"text": "x"}), 400,
                 "no usable tokenizer")
    idx = {m["name"]: m for m in d.post("/v2/repository/index").json()}
    check(idx["oddvocab_named"]["state"] == "UNAVAILABLE" and "byte" in idx["oddvocab_named"]["reason"],
          idx["oddvocab_named"])


def test_v1_models(c):
    j = check_status(c.d.get("/v1/models"), 200).json()
    check(j["object"] == "list", j)
    ids = sorted(m["id"] for m in j["data"])
    check(ids == ["bpe", "bytes", "short"], ids)
    check(all(m["object"] == "model" and m["owned_by"] == "tallyd" for m in j["data"]), j)


# ---------------------------------------------------------------- completions

def test_greedy_shape_and_determinism(c):
    d = c.d
    a = ok(d, model="bytes", prompt="The cat", max_tokens=12, temperature=0)
    check(a["object"] == "text_completion" and a["id"].startswith("cmpl-"), a)
    check(a["model"] == "bytes" and len(a["choices"]) == 1, a)
    ch = a["choices"][0]
    check(ch["index"] == 0 and ch["finish_reason"] == "length" and ch["logprobs"] is None, ch)
    check(a["usage"] == {"prompt_tokens": 7, "completion_tokens": 12, "total_tokens": 19}, a)
    b = ok(d, model="bytes", prompt="The cat", max_tokens=12, temperature=0)
    check(b["choices"][0]["text"] == ch["text"], (a, b))
    # a prompt as token ids gives the same text
    ids = list("The cat".encode())
    e = ok(d, model="bytes", prompt=ids, max_tokens=12, temperature=0)
    check(e["choices"][0]["text"] == ch["text"], e)


def test_greedy_same_under_load(c):
    d = c.d
    alone = ok(d, model="bytes", prompt="load test", max_tokens=40, temperature=0)
    texts, errors = [], []

    def one(i):
        try:
            r = complete(d, model="bytes", prompt="other %d" % i, max_tokens=60,
                         temperature=0.8, seed=i)
            if r.status != 200:
                errors.append(r)
        except Exception as ex:  # noqa: BLE001
            errors.append(ex)

    def mine():
        try:
            texts.append(ok(d, model="bytes", prompt="load test", max_tokens=40,
                            temperature=0)["choices"][0]["text"])
        except Exception as ex:  # noqa: BLE001
            errors.append(ex)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    ts += [threading.Thread(target=mine) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    check(not errors, errors)
    check(texts == [alone["choices"][0]["text"]] * 3, (texts, alone))


def test_seed_reproducible(c):
    d = c.d
    body = dict(model="bytes", prompt="seeded", max_tokens=30, temperature=1.0, top_p=0.95,
                seed=1234)
    a, b = ok(d, **body), ok(d, **body)
    check(a["choices"][0]["text"] == b["choices"][0]["text"], (a, b))
    texts = {ok(d, **dict(body, seed=s))["choices"][0]["text"] for s in range(5)}
    check(len(texts) > 1, "five seeds gave one text: %r" % texts)


def test_stream_matches_whole(c):
    d = c.d
    body = dict(model="bytes", prompt="stream me", max_tokens=25, temperature=0)
    whole = ok(d, **body)["choices"][0]
    events, done = stream_events(d, "/v1/completions", dict(body, stream=True))
    check(done, "no data: [DONE]")
    check(len(events) >= 2, events)
    text = "".join(e["choices"][0]["text"] for e in events)
    check(text == whole["text"], (text, whole["text"]))
    check(events[-1]["choices"][0]["finish_reason"] == "length", events[-1])
    check(all(e["choices"][0]["finish_reason"] is None for e in events[:-1]), events)
    check(len({e["id"] for e in events}) == 1, "one id per stream")


def test_stop_strings(c):
    d = c.d
    base = dict(model="bytes", prompt="stop here", max_tokens=30, temperature=0)
    text = ok(d, **base)["choices"][0]["text"]
    stop = text[6:8]
    check(len(stop) == 2, text)
    cut = text.find(stop)
    a = ok(d, **dict(base, stop=[stop, "never\u2603"]))["choices"][0]
    check(a["text"] == text[:cut], (a, text, stop))
    check(a["finish_reason"] == "stop", a)
    # streamed: the same cut, never a byte of the stop string sent
    events, done = stream_events(d, "/v1/completions", dict(base, stop=stop, stream=True))
    got = "".join(e["choices"][0]["text"] for e in events)
    check(done and got == text[:cut], (got, text[:cut]))
    check(events[-1]["choices"][0]["finish_reason"] == "stop", events[-1])


def test_n_choices_and_logprobs(c):
    d = c.d
    a = ok(d, model="bytes", prompt="abc", max_tokens=8, temperature=1.0, seed=9, n=3,
           logprobs=2)
    check([ch["index"] for ch in a["choices"]] == [0, 1, 2], a)
    check(a["usage"]["prompt_tokens"] == 3 and a["usage"]["completion_tokens"] == 24, a["usage"])
    for ch in a["choices"]:
        lp = ch["logprobs"]
        check(len(lp["tokens"]) == 8 and len(lp["token_logprobs"]) == 8, lp)
        check(len(lp["top_logprobs"]) == 8 and len(lp["text_offset"]) == 8, lp)
        check(all(v <= 0 for v in lp["token_logprobs"]), lp)
        check(all(1 <= len(t) <= 2 for t in lp["top_logprobs"]), lp)
        check(lp["text_offset"] == sorted(lp["text_offset"]), lp)
    # greedy choices are all the same text
    g = ok(d, model="bytes", prompt="abc", max_tokens=8, temperature=0, n=2)
    check(g["choices"][0]["text"] == g["choices"][1]["text"], g)


def test_echo_scores_prompt_like_infer(c):
    d = c.d
    ids = [(7 * i + 3) % 256 for i in range(40)]
    a = ok(d, model="bytes", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    ch = a["choices"][0]
    lp = ch["logprobs"]["token_logprobs"]
    check(len(lp) == 40 and lp[0] is None, lp[:3])
    r = check_status(d.infer("bytes", [tensor("input_ids", [ids], datatype="INT64")]), 200)
    want = output(r, "token_logprobs")["data"]
    check(len(want) >= 39, len(want))
    for i in range(39):
        check(abs(lp[i + 1] - want[i]) <= 1e-4, "token %d: %r vs %r" % (i + 1, lp[i + 1], want[i]))
    check(a["usage"]["completion_tokens"] == 0, a["usage"])
    # echo without logprobs: the text starts with the prompt
    t = ok(d, model="bytes", prompt="echo ", max_tokens=3, echo=True, temperature=0)
    check(t["choices"][0]["text"].startswith("echo "), t)


def test_errors_openai_shape(c):
    d = c.d
    good = dict(model="bytes", prompt="x", max_tokens=2)
    cases = [
        (dict(good, temperature=-1), "temperature"),
        (dict(good, top_p=0), "top_p"),
        (dict(good, top_k=-1), "top_k"),
        (dict(good, min_p=1.5), "min_p"),
        (dict(good, max_tokens=-1), "max_tokens"),
        (dict(good, n=17), "n"),
        (dict(good, logprobs=21), "logprobs"),
        (dict(good, stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(good, bogus=1), "bogus"),
        (dict(good, prompt=[1, 2, 300]), "prompt"),
        (dict(good, prompt={"a": 1}), "prompt"),
    ]
    for body, name in cases:
        openai_error(complete(d, **body), 400, contains=name)
    openai_error(complete(d, prompt="x"), 400, param="model")
    openai_error(complete(d, model="bytes"), 400, param="prompt")
    openai_error(complete(d, model="nope", prompt="x"), 404, param="model")
    openai_error(complete(d, model="mlp", prompt="x"), 400, param="model", contains="tokenizer")
    # learned positions stop at n_positions 64
    openai_error(complete(d, model="short", prompt="y" * 60, max_tokens=10), 400)
    ok(d, model="short", prompt="y" * 50, max_tokens=10)
    r = d.post("/v1/completions", None, headers={"Content-Type": "application/json"})
    openai_error(r, 400)


def test_client_leaves_mid_stream(c):
    d = c.d

    def completion_tokens():
        for ln in d.get("/metrics").body.decode().splitlines():
            if ln.startswith('tallyd_generate_tokens_total{model="bytes",type="completion"}'):
                return int(ln.split()[-1])
        return 0

    before = completion_tokens()
    body = dict(model="bytes", prompt="long", max_tokens=4000, temperature=0, ignore_eos=True,
                stream=True)
    events, done = stream_events(d, "/v1/completions", body, stop_after=3)
    check(len(events) == 3 and not done, events)
    deadline = time.time() + 10
    active = None
    while time.time() < deadline:
        m = d.get("/metrics").body.decode()
        active = [ln for ln in m.splitlines()
                  if ln.startswith('tallyd_generate_sequences_active{model="bytes"}')]
        if active and active[0].endswith(" 0"):
            break
        time.sleep(0.1)
    check(active and active[0].endswith(" 0"), "still active: %s" % active)
    made = completion_tokens() - before
    print("tokens made before the sequence ended: %d of 4000" % made)
    check(3 <= made < 4000, "the sequence ran to the end (%d tokens) after its client left" % made)


def test_triton_generate(c):
    d = c.d
    j = check_status(d.post("/v2/models/bytes/generate",
                            {"text_input": "Hi", "parameters": {"max_tokens": 6,
                                                                "temperature": 0}}), 200).json()
    check(set(j) == {"model_name", "model_version", "text_output", "finish_reason", "usage"}, j)
    check(j["model_name"] == "bytes" and j["model_version"] == "1", j)
    check(j["finish_reason"] == "length" and j["usage"]["completion_tokens"] == 6, j)
    same = ok(d, model="bytes", prompt="Hi", max_tokens=6, temperature=0)
    check(same["choices"][0]["text"] == j["text_output"], (same, j))
    events, done = stream_events(d, "/v2/models/bytes/versions/1/generate_stream",
                                 {"text_input": "Hi", "parameters": {"max_tokens": 6,
                                                                     "temperature": 0}})
    check(done, "no [DONE]")
    check("".join(e["text_output"] for e in events) == j["text_output"], events)
    check(events[-1]["finish_reason"] == "length" and "usage" in events[-1], events[-1])
    check_status(d.post("/v2/models/bytes/generate",
                        {"text_input": "Hi", "parameters": {"max_token": 6}}), 400, "max_token")
    check_status(d.post("/v2/models/bytes/generate", {"parameters": {}}), 400, "text_input")
    check_status(d.post("/v2/models/mlp/generate", {"text_input": "Hi"}), 400, "tokenizer")


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
