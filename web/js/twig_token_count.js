// Live token count under the prompts of "Twig Text Encode": "tokens: 812 / 1200" against the max_tokens of the
// connected Twig Text Encoder Loader, while you type. The pack's server route (POST /twig/token_count, see
// nodes/tokens.py) counts with the text encoder's tokenizer only; the Gemma weights are never loaded for it.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { TEXT_ENCODE, TOKEN_ROUTE, buildRequest, debounce, describe, parseResponse, requestBody, requestKey } from "./twig_logic.js";

const WIDGET = "twig_token_count";
const COLORS = { ok: "", near: "#e0c060", over: "#f0a040", error: "#e06060", info: "" };
const POLL_MS = 1000; // picks up loader changes, new links and loaded workflows
const DEBOUNCE_MS = 350;

function chain(original, extra) {
    return function (...args) {
        const r = original?.apply(this, args);
        extra.apply(this, args);
        return r;
    };
}

class Counter {
    constructor(node) {
        this.node = node;
        this.key = null;
        this.seq = 0;
        this.el = document.createElement("div");
        Object.assign(this.el.style, {
            font: "12px monospace", lineHeight: "18px", opacity: "0.8", padding: "0 6px", whiteSpace: "nowrap",
            overflow: "hidden", textOverflow: "ellipsis", pointerEvents: "none",
        });
        const widget = node.addDOMWidget(WIDGET, "twig_token_count", this.el, {
            serialize: false, // display only: not saved in the workflow, not sent with the prompt
            hideOnZoom: false,
            getValue: () => this.el.textContent,
            setValue: () => {},
            margin: 4, // the element gets the widget's height less twice this
            getMinHeight: () => 26,
            getMaxHeight: () => 26,
        });
        widget.serialize = false;
        this.widget = widget;
        this.fetchSoon = debounce(() => this.fetch(), DEBOUNCE_MS);
        for (const name of ["positive", "negative"]) {
            const w = node.widgets?.find((x) => x.name === name);
            if (w) w.callback = chain(w.callback, () => this.check());
            w?.inputEl?.addEventListener?.("input", () => this.check());
        }
        this.show({ text: "", level: "info" });
    }

    show({ text, level }) {
        this.el.textContent = text;
        this.el.title = text;
        this.el.style.color = COLORS[level] || "";
    }

    check() {
        const graph = this.node.graph ?? app.graph;
        const req = buildRequest(graph, this.node);
        const key = requestKey(req);
        if (key === this.key) return;
        this.key = key;
        this.req = req;
        if (req.missing) {
            this.fetchSoon.cancel();
            this.show(describe(null, req));
            return;
        }
        this.fetchSoon();
    }

    async fetch() {
        const req = this.req;
        const mine = ++this.seq;
        let result;
        try {
            const resp = await api.fetchApi(TOKEN_ROUTE, {
                method: "POST", headers: { "Content-Type": "application/json" }, body: requestBody(req),
            });
            let body = null;
            try {
                body = await resp.json();
            } catch {
                body = null;
            }
            result = parseResponse(resp.status, body);
        } catch (e) {
            result = { ok: false, error: `token count unavailable: ${e?.message ?? e}` };
        }
        if (mine !== this.seq) return; // a newer request was sent meanwhile
        this.show(describe(result, req));
    }
}

function growToFit(node) {
    const min = node.computeSize?.();
    if (min && node.size && min[1] > node.size[1]) node.setSize([node.size[0], min[1]]);
}

let timer = null;

function pollAll() {
    for (const node of app.graph?._nodes ?? app.graph?.nodes ?? []) {
        node.twigCounter?.check();
    }
}

app.registerExtension({
    name: "twig.TokenCount",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== TEXT_ENCODE) return;
        nodeType.prototype.onNodeCreated = chain(nodeType.prototype.onNodeCreated, function () {
            this.twigCounter = new Counter(this);
        });
        nodeType.prototype.onConnectionsChange = chain(nodeType.prototype.onConnectionsChange, function () {
            this.twigCounter?.check();
        });
        nodeType.prototype.onConfigure = chain(nodeType.prototype.onConfigure, function () {
            // a workflow saved without this line (or smaller) gets the room for it back
            requestAnimationFrame(() => growToFit(this));
            this.twigCounter?.check();
        });
        if (timer === null) timer = setInterval(pollAll, POLL_MS);
    },
});
