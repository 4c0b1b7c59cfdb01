// Shows the token report of "Twig Text Encode" on the node itself after it runs
// (prompt token counts against the budget, and how many tokens were cut when a prompt is too long).
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const WIDGET = "token_report_display";

function showReport(node, text) {
    let widget = node.widgets?.find((w) => w.name === WIDGET);
    if (!widget) {
        widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.serialize = false; // display only: not saved in the workflow, not sent with the prompt
        if (widget.options) widget.options.serialize = false;
        if (widget.inputEl) {
            widget.inputEl.readOnly = true;
            widget.inputEl.style.opacity = 0.75;
        }
    }
    widget.value = text;
    if (widget.inputEl) {
        widget.inputEl.style.color = text.includes("WARNING") ? "#f0a040" : "";
    }
    node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
    name: "twig.TokenReport",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== "TwigTextEncode") return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            const text = Array.isArray(message?.text) ? message.text.join("\n") : "";
            if (text) showReport(this, text);
        };
    },
});
