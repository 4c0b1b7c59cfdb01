// node --test web/js/twig_logic.test.mjs   (run by tests/test_web_js.py as part of pytest)
import assert from "node:assert/strict";
import { test } from "node:test";

import {
    buildRequest,
    debounce,
    describe,
    formatCount,
    level,
    linkById,
    parseResponse,
    requestBody,
    requestKey,
    uiText,
    upstreamNode,
} from "./twig_logic.js";

function fakeTimers() {
    let now = 0;
    let next = 1;
    const pending = new Map();
    return {
        setTimeout(fn, ms) {
            const id = next++;
            pending.set(id, { fn, at: now + ms });
            return id;
        },
        clearTimeout(id) {
            pending.delete(id);
        },
        advance(ms) {
            now += ms;
            for (const [id, t] of [...pending].sort((a, b) => a[1].at - b[1].at)) {
                if (t.at <= now) {
                    pending.delete(id);
                    t.fn();
                }
            }
        },
        get size() {
            return pending.size;
        },
    };
}

// A graph the way the frontend holds it: nodes with inputs {name, link} and widgets {name, value}, links by id.
function graphOf(nodes, links, asMap = true) {
    const table = asMap ? new Map(links.map((l) => [l.id, l])) : Object.fromEntries(links.map((l) => [l.id, l]));
    return { links: table, getNodeById: (id) => nodes.find((n) => n.id === id) ?? null };
}

function loader(id, name = "gemma-2-2b-it/", max = 1200) {
    return { id, type: "TwigTextEncoderLoader", inputs: [], widgets: [{ name: "text_encoder_name", value: name }, { name: "max_tokens", value: max }, { name: "device", value: "default" }] };
}

function encode(id, link, positive = "a red circle", negative = "", extra = []) {
    return {
        id,
        type: "TwigTextEncode",
        inputs: [{ name: "text_encoder", link }, ...extra],
        widgets: [{ name: "positive", value: positive }, { name: "negative", value: negative }, { name: "unload_after", value: false }],
    };
}

test("debounce calls once, after the last call, with the last arguments", () => {
    const timers = fakeTimers();
    const calls = [];
    const d = debounce((x) => calls.push(x), 300, timers);
    d(1);
    timers.advance(200);
    d(2);
    timers.advance(200);
    assert.deepEqual(calls, []);
    assert.equal(d.pending(), true);
    timers.advance(100);
    assert.deepEqual(calls, [2]);
    assert.equal(d.pending(), false);
});

test("debounce cancel drops the pending call and flush runs it now", () => {
    const timers = fakeTimers();
    const calls = [];
    const d = debounce((x) => calls.push(x), 300, timers);
    d("a");
    d.cancel();
    timers.advance(1000);
    assert.deepEqual(calls, []);
    d("b");
    d.flush();
    assert.deepEqual(calls, ["b"]);
    assert.equal(timers.size, 0);
    d.flush(); // nothing pending: no second call
    assert.deepEqual(calls, ["b"]);
});

test("formatCount and level", () => {
    assert.equal(formatCount(812, 1200), "812 / 1200");
    assert.equal(level({ tokens: 812, kept: 812 }, 1200), "ok");
    assert.equal(level({ tokens: 1100, kept: 1100 }, 1200), "near");
    assert.equal(level({ tokens: 1400, kept: 1199 }, 1200), "over");
    assert.equal(level(null, 300), "ok");
});

test("linkById reads Map and plain-object link tables", () => {
    const link = { id: 5, origin_id: 1, origin_slot: 0 };
    assert.equal(linkById({ links: new Map([[5, link]]) }, 5), link);
    assert.equal(linkById({ links: { 5: link } }, 5), link);
    assert.equal(linkById({ links: new Map() }, 6), null);
    assert.equal(linkById({ links: {} }, null), null);
});

test("buildRequest finds the loader through reroutes and reads its widgets", () => {
    for (const asMap of [true, false]) {
        const nodes = [loader(1), { id: 2, type: "Reroute", inputs: [{ name: "", link: 10 }], widgets: [] }, encode(3, 11, "左边一个红色的圆", "blurry")];
        const g = graphOf(nodes, [{ id: 10, origin_id: 1, origin_slot: 0 }, { id: 11, origin_id: 2, origin_slot: 0 }], asMap);
        assert.equal(upstreamNode(g, nodes[2], "text_encoder").id, 1);
        const req = buildRequest(g, nodes[2]);
        assert.deepEqual(req, { text_encoder: "gemma-2-2b-it/", max_tokens: 1200, positive: "左边一个红色的圆", negative: "blurry", positiveLinked: false, negativeLinked: false });
        assert.deepEqual(JSON.parse(requestBody(req)), { text_encoder: "gemma-2-2b-it/", max_tokens: 1200, positive: "左边一个红色的圆", negative: "blurry" });
    }
});

test("buildRequest says what is missing", () => {
    const lonely = encode(1, null);
    assert.match(buildRequest(graphOf([lonely], []), lonely).missing, /connect a Twig Text Encoder Loader/);
    const other = { id: 2, type: "SomethingElse", inputs: [], widgets: [] };
    const n = encode(3, 7);
    assert.match(buildRequest(graphOf([other, n], [{ id: 7, origin_id: 2, origin_slot: 0 }]), n).missing, /TwigTextEncoderLoader/);
    const empty = loader(4, "");
    const m = encode(5, 8);
    assert.match(buildRequest(graphOf([empty, m], [{ id: 8, origin_id: 4, origin_slot: 0 }]), m).missing, /pick a text encoder/);
});

test("a prompt fed by a link (TIPO) is not counted from the stale widget", () => {
    const n = encode(2, 9, "old text", "", [{ name: "positive", link: 12, widget: { name: "positive" } }]);
    const g = graphOf([loader(1), n], [{ id: 9, origin_id: 1, origin_slot: 0 }]);
    const req = buildRequest(g, n);
    assert.equal(req.positive, "");
    assert.equal(req.positiveLinked, true);
    const line = describe({ ok: true, max: 1200, positive: { tokens: 0, kept: 0 }, negative: { tokens: 0, kept: 0 } }, req);
    assert.equal(line.text, "tokens: from a link (counted when run)");
});

test("requestKey changes when text, encoder, budget or links change, and only then", () => {
    const base = { text_encoder: "a/", max_tokens: 300, positive: "x", negative: "", positiveLinked: false, negativeLinked: false };
    const k = requestKey(base);
    assert.equal(requestKey({ ...base }), k);
    for (const change of [{ positive: "y" }, { negative: "n" }, { max_tokens: 1200 }, { text_encoder: "b/" }, { positiveLinked: true }]) {
        assert.notEqual(requestKey({ ...base, ...change }), k, JSON.stringify(change));
    }
    assert.equal(requestKey({ missing: "why" }), "missing:why");
});

test("parseResponse accepts the route's answer and reports errors", () => {
    const ok = parseResponse(200, { max_tokens: 1200, positive: { tokens: 812, kept: 812 }, negative: { tokens: 3, kept: 3 } });
    assert.deepEqual(ok, { ok: true, max: 1200, positive: { tokens: 812, kept: 812 }, negative: { tokens: 3, kept: 3 } });
    assert.deepEqual(parseResponse(404, { error: "model 'x/' not found" }), { ok: false, error: "model 'x/' not found" });
    assert.deepEqual(parseResponse(500, null), { ok: false, error: "token count unavailable (HTTP 500)" });
    assert.equal(parseResponse(200, { max_tokens: 300 }).ok, false);
    assert.equal(parseResponse(200, { max_tokens: "x", positive: { tokens: 1, kept: 1 } }).ok, false);
});

test("describe: the line under the prompts", () => {
    const req = { text_encoder: "a/", max_tokens: 1200, positive: "p", negative: "", positiveLinked: false, negativeLinked: false };
    const r = (pos, neg) => ({ ok: true, max: 1200, positive: pos, negative: neg });
    assert.deepEqual(describe(r({ tokens: 812, kept: 812 }, { tokens: 0, kept: 0 }), req), { text: "tokens: 812 / 1200", level: "ok" });
    assert.deepEqual(describe(r({ tokens: 812, kept: 812 }, { tokens: 4, kept: 4 }), req), { text: "tokens: 812 / 1200 · negative: 4 / 1200", level: "ok" });
    assert.deepEqual(describe(r({ tokens: 1500, kept: 1199 }, null), req), { text: "tokens: 1500 / 1200 — 301 cut", level: "over" });
    assert.equal(describe(r({ tokens: 1150, kept: 1150 }, null), req).level, "near");
    assert.deepEqual(describe({ ok: false, error: "no tokenizer" }, req), { text: "no tokenizer", level: "error" });
    assert.deepEqual(describe(null, { missing: "connect it" }), { text: "connect it", level: "info" });
    assert.equal(describe(null, req).level, "info");
});

test("uiText joins a node's ui text output", () => {
    assert.equal(uiText({ text: ["1girl, red hair", "second"] }), "1girl, red hair\nsecond");
    assert.equal(uiText({ text: "plain" }), "plain");
    assert.equal(uiText(undefined), "");
    assert.equal(uiText({ images: [] }), "");
});
