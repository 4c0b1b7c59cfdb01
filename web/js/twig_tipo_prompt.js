// Shows the expanded prompt on the "Twig TIPO Prompt Expansion" node after it runs (the node sends it as its
// "ui" text), in a read-only box under the node's inputs.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";
import { uiText } from "./twig_logic.js";

const WIDGET = "expanded_prompt";

function showPrompt(node, text) {
    let widget = node.widgets?.find((w) => w.name === WIDGET);
    if (!widget) {
        widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.serialize = false; // display only: not saved in the workflow, not sent with the prompt
        if (widget.options) widget.options.serialize = false;
        if (widget.inputEl) {
            widget.inputEl.readOnly = true;
            widget.inputEl.style.opacity = 0.85;
            widget.inputEl.placeholder = "expanded prompt";
        }
        const min = node.computeSize?.();  // room for a few lines of the new box
        if (min) node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1] + 90, min[1])]);
    }
    widget.value = text;
    node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
    name: "twig.TipoPrompt",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== "TwigTIPO") return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            const text = uiText(message);
            if (text) showPrompt(this, text);
        };
    },
});
