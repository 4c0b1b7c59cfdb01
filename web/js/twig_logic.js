// Pure helpers of the Twig frontend extensions: no ComfyUI imports, no DOM, so node's test runner can check
// them (twig_logic.test.mjs). Used by twig_token_count.js and twig_tipo_prompt.js.

export const TOKEN_ROUTE = "/twig/token_count";
export const TEXT_ENCODE = "TwigTextEncode";
export const TEXT_ENCODER_LOADER = "TwigTextEncoderLoader";
export const PASS_THROUGH = ["Reroute"]; // frontend nodes that only forward a link

/** debounce(fn, wait): calls fn once, `wait` ms after the last call; .cancel() drops a pending call,
 *  .flush() runs it now. `timers` lets tests drive time. */
export function debounce(fn, wait, timers = globalThis) {
    let handle = null;
    let lastArgs = [];
    const run = () => {
        handle = null;
        fn(...lastArgs);
    };
    const debounced = (...args) => {
        lastArgs = args;
        if (handle !== null) timers.clearTimeout(handle);
        handle = timers.setTimeout(run, wait);
    };
    debounced.cancel = () => {
        if (handle !== null) timers.clearTimeout(handle);
        handle = null;
    };
    debounced.flush = () => {
        if (handle === null) return;
        timers.clearTimeout(handle);
        run();
    };
    debounced.pending = () => handle !== null;
    return debounced;
}

/** The link with id `id` in a LiteGraph graph (links are a Map in current frontends, an object in older ones). */
export function linkById(graph, id) {
    if (id === null || id === undefined || !graph) return null;
    const links = graph.links;
    if (!links) return null;
    if (typeof links.get === "function") return links.get(id) ?? null;
    return links[id] ?? null;
}

export function nodeById(graph, id) {
    if (!graph) return null;
    if (typeof graph.getNodeById === "function") return graph.getNodeById(id) ?? null;
    return (graph.nodes || graph._nodes || []).find((n) => n.id === id) ?? null;
}

/** The node feeding `node`'s input `inputName`, looking through Reroute nodes; null when not connected. */
export function upstreamNode(graph, node, inputName, passThrough = PASS_THROUGH) {
    let current = node;
    let name = inputName;
    for (let hops = 0; hops < 64 && current; hops++) {
        const input = (current.inputs || []).find((i) => (name === null ? true : i.name === name));
        if (!input || input.link === null || input.link === undefined) return null;
        const link = linkById(graph, input.link);
        if (!link) return null;
        const origin = nodeById(graph, link.origin_id);
        if (!origin) return null;
        if (!passThrough.includes(origin.type)) return origin;
        current = origin;
        name = null; // a reroute has one input
    }
    return null;
}

export function widgetValue(node, name) {
    const w = (node?.widgets || []).find((x) => x.name === name);
    return w ? w.value : undefined;
}

export function inputIsLinked(node, name) {
    const input = (node?.inputs || []).find((i) => i.name === name);
    return !!input && input.link !== null && input.link !== undefined;
}

/** What to ask the server for one Twig Text Encode node, or {missing: why} when it cannot be counted. */
export function buildRequest(graph, node) {
    const loader = upstreamNode(graph, node, "text_encoder");
    if (!loader) return { missing: "connect a Twig Text Encoder Loader to count tokens" };
    if (loader.type !== TEXT_ENCODER_LOADER) return { missing: `token count needs ${TEXT_ENCODER_LOADER} upstream` };
    const textEncoder = widgetValue(loader, "text_encoder_name");
    const maxTokens = Number(widgetValue(loader, "max_tokens"));
    if (typeof textEncoder !== "string" || !textEncoder) return { missing: "pick a text encoder in the loader" };
    const positiveLinked = inputIsLinked(node, "positive");
    const negativeLinked = inputIsLinked(node, "negative");
    const text = (name, linked) => (linked ? "" : String(widgetValue(node, name) ?? ""));
    return {
        text_encoder: textEncoder,
        max_tokens: Number.isFinite(maxTokens) ? maxTokens : 300,
        positive: text("positive", positiveLinked),
        negative: text("negative", negativeLinked),
        positiveLinked,
        negativeLinked,
    };
}

/** A string that changes exactly when the answer could change. */
export function requestKey(req) {
    if (!req || req.missing) return `missing:${req?.missing ?? ""}`;
    return JSON.stringify([req.text_encoder, req.max_tokens, req.positive, req.negative, req.positiveLinked, req.negativeLinked]);
}

/** The JSON body for POST /twig/token_count. */
export function requestBody(req) {
    return JSON.stringify({ text_encoder: req.text_encoder, max_tokens: req.max_tokens, positive: req.positive, negative: req.negative });
}

/** Read the route's answer: {ok: true, max, positive: {tokens, kept}, negative} or {ok: false, error}. */
export function parseResponse(status, body) {
    if (status !== 200 || !body || typeof body !== "object") {
        const error = body && typeof body === "object" && body.error ? String(body.error) : `token count unavailable (HTTP ${status})`;
        return { ok: false, error };
    }
    const side = (x) => {
        if (!x || typeof x !== "object") return null;
        const tokens = Number(x.tokens);
        const kept = Number(x.kept ?? x.tokens);
        return Number.isFinite(tokens) && Number.isFinite(kept) ? { tokens, kept } : null;
    };
    const max = Number(body.max_tokens);
    const positive = side(body.positive);
    if (!Number.isFinite(max) || !positive) return { ok: false, error: "token count: unexpected answer from the server" };
    return { ok: true, max, positive, negative: side(body.negative) };
}

/** "812 / 1200" */
export function formatCount(tokens, max) {
    return `${tokens} / ${max}`;
}

/** ok below 90 % of the budget, near up to it, over when tokens were cut. */
export function level(side, max) {
    if (!side) return "ok";
    if (side.kept < side.tokens) return "over";
    return side.tokens >= 0.9 * max ? "near" : "ok";
}

const RANK = { ok: 0, near: 1, over: 2, error: 3, info: 0 };

/** The line shown under the prompts and its level (ok | near | over | error | info). */
export function describe(result, req) {
    if (req && req.missing) return { text: req.missing, level: "info" };
    if (!result) return { text: "counting tokens…", level: "info" };
    if (!result.ok) return { text: result.error, level: "error" };
    const parts = [];
    let worst = "ok";
    const add = (label, side, linked) => {
        if (linked) {
            parts.push(`${label}: from a link (counted when run)`);
            return;
        }
        if (!side) return;
        let text = `${label}: ${formatCount(side.tokens, result.max)}`;
        if (side.kept < side.tokens) text += ` — ${side.tokens - side.kept} cut`;
        parts.push(text);
        const l = level(side, result.max);
        if (RANK[l] > RANK[worst]) worst = l;
    };
    add("tokens", result.positive, req?.positiveLinked);
    if (req?.negativeLinked || (result.negative && result.negative.tokens > 0)) add("negative", result.negative, req?.negativeLinked);
    return { text: parts.join(" · "), level: worst };
}

/** The text a node sent with its "ui" output ({"text": [...]}), as one string. */
export function uiText(message) {
    const text = message?.text;
    if (Array.isArray(text)) return text.map((t) => String(t)).join("\n");
    if (typeof text === "string") return text;
    return "";
}
