// Diffusion Feature: a layer picker on DFAttachHooks, DFCaptureLayers and DFExtractNative, and the layer list shown
// on DFShowLayers.
// The picker lists every valid id of the connected model's family (GET /diffusion_feature/layers), grouped by stage
// and level, with shapes, searchable; "Apply" writes the chosen ids into the node's `layers` text widget. The text
// widget stays the source of truth, so headless (API) workflows never need this file.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// Loaders whose file tells the family: ours (DF_MODEL) and ComfyUI's own Load Checkpoint and Load Diffusion Model
// (MODEL; Flux ships as a bare diffusion model).
const LOADERS = { DFLoadCheckpoint: ["checkpoints", "ckpt_name"], DFLoadDiffusers: ["diffusers", "model_path"],
                  CheckpointLoaderSimple: ["checkpoints", "ckpt_name"], UNETLoader: ["diffusion_models", "unet_name"] };
const MODEL_TYPES = ["DF_MODEL", "MODEL"];
const PICKER_NODES = ["DFAttachHooks", "DFCaptureLayers", "DFExtractNative"];
const FAMILIES = ["sd15", "sd21", "sdxl", "playground-v2", "pixart-sigma", "flux", "sd3", "qwen-image", "z-image"];

export function widget(node, name) {
    return (node.widgets || []).find((w) => w.name === name);
}

// Walk up DF_MODEL / MODEL links (through LoraLoader, DFCaptureLayers, ...) to the loader node and ask it (or the
// server) for the family.
async function familyOf(node) {
    let current = node;
    for (let hops = 0; current && hops < 32; hops++) {
        const loader = LOADERS[current.type];
        if (loader) {
            const chosen = widget(current, "family")?.value;
            if (chosen && chosen !== "auto") return chosen;
            const name = widget(current, loader[1])?.value;
            if (!name) return null;
            const res = await api.fetchApi(`/diffusion_feature/family?kind=${loader[0]}&name=${encodeURIComponent(name)}`);
            const body = await res.json();
            return res.ok ? body.family : null;
        }
        const slot = (current.inputs || []).findIndex((i) => MODEL_TYPES.includes(i.type));
        current = slot >= 0 ? current.getInputNode(slot) : null;
    }
    return null;
}

function closePicker() {
    document.querySelectorAll(".df-picker").forEach((el) => el.remove());
}

export function el(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    Object.assign(e, attrs);
    for (const c of children) e.append(c);
    return e;
}

async function openPicker(node, family) {
    closePicker();
    const target = widget(node, "layers");
    const chosen = new Set((target.value || "").split(/[\s,]+/).filter(Boolean));
    const dialog = el("div", { className: "df-picker" });
    Object.assign(dialog.style, {
        position: "fixed", left: "50%", top: "8%", transform: "translateX(-50%)", width: "620px", maxHeight: "80%",
        display: "flex", flexDirection: "column", gap: "6px", padding: "10px", zIndex: 10000,
        background: "var(--comfy-menu-bg, #222)", color: "var(--fg-color, #ddd)", border: "1px solid #666",
        borderRadius: "6px", fontFamily: "monospace", fontSize: "12px",
    });
    const familySelect = el("select", { className: "df-picker-family" });
    for (const f of FAMILIES) familySelect.append(el("option", { value: f, textContent: f, selected: f === family }));
    const search = el("input", { className: "df-picker-search", placeholder: "search ids, e.g. up-level1 cross-q" });
    const count = el("span", { className: "df-picker-count" });
    const list = el("div", { className: "df-picker-list" });
    Object.assign(list.style, { overflowY: "auto", flex: "1", minHeight: "200px" });
    const apply = el("button", { className: "df-picker-apply", textContent: "Apply" });
    const cancel = el("button", { className: "df-picker-cancel", textContent: "Cancel" });
    dialog.append(el("div", {}, "Layers of ", familySelect, " ", count), search, list, el("div", {}, apply, " ", cancel));
    document.body.append(dialog);

    let layers = [];
    const render = () => {
        const words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
        list.replaceChildren();
        let group = null, shown = 0;
        for (const layer of layers) {
            if (!words.every((w) => layer.id.includes(w))) continue;
            if (layer.group !== group) {
                group = layer.group;
                list.append(el("div", { className: "df-picker-group", textContent: group }));
            }
            const box = el("input", { type: "checkbox", checked: chosen.has(layer.id) });
            box.addEventListener("change", () => (box.checked ? chosen.add(layer.id) : chosen.delete(layer.id)));
            const row = el("label", { className: "df-picker-item" }, box, ` ${layer.id}  `,
                el("span", { textContent: layer.shape.join(" x "), style: "opacity:0.6" }));
            row.dataset.id = layer.id;
            list.append(row, el("br"));
            shown++;
        }
        count.textContent = `${shown} of ${layers.length} ids`;
    };
    const load = async (fam) => {
        const res = await api.fetchApi(`/diffusion_feature/layers?family=${encodeURIComponent(fam)}`);
        layers = res.ok ? (await res.json()).layers : [];
        render();
    };
    familySelect.addEventListener("change", () => load(familySelect.value));
    search.addEventListener("input", render);
    cancel.addEventListener("click", closePicker);
    apply.addEventListener("click", () => {
        target.value = [...chosen].join("\n");
        node.setDirtyCanvas(true, true);
        closePicker();
    });
    await load(family || "sd15");
    search.focus();
}

// DFShowLayers' list: a read-only, scrollable multi-line text box. It is output, not input: never sent back in a
// prompt (options.serialize false: every frontend's graphToPrompt skips it) nor stored in a saved workflow
// (widget.serialize false: current frontends skip it in widgets_values; dropLayerList covers the 2024 frontend).
const LAYER_LIST = "layer list";

function showLayerList(node, text) {
    let shown = widget(node, LAYER_LIST);
    if (!shown) {
        const area = el("textarea", { className: "df-layer-list comfy-multiline-input", readOnly: true,
                                      spellcheck: false, wrap: "off" });
        Object.assign(area.style, { fontFamily: "monospace", fontSize: "11px", whiteSpace: "pre", overflow: "auto",
                                    resize: "none", boxSizing: "border-box", width: "100%", height: "100%" });
        shown = node.addDOMWidget(LAYER_LIST, "df_layer_list", area, {
            getValue: () => area.value,
            setValue: (v) => { area.value = v ?? ""; },
            getMinHeight: () => 200,
            serialize: false,
        });
        shown.serialize = false;
        shown.options.serialize = false;
        node.setSize([Math.max(node.size[0], 440), Math.max(node.size[1], 320)]);
    }
    shown.value = text;
    node.setDirtyCanvas(true, true);
}

function dropLayerList(node, data) {
    const shown = widget(node, LAYER_LIST);
    const i = shown ? node.widgets.indexOf(shown) : -1;
    if (i >= 0 && Array.isArray(data.widgets_values) && data.widgets_values.length > i
            && data.widgets_values[i] === shown.value) {
        data.widgets_values.splice(i, 1);
    }
}

app.registerExtension({
    name: "diffusion_feature.layer_picker",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (PICKER_NODES.includes(nodeData.name)) {
            const created = nodeType.prototype.onNodeCreated;
            nodeType.prototype.onNodeCreated = function () {
                const result = created?.apply(this, arguments);
                this.addWidget("button", "pick layers…", null, async () => openPicker(this, await familyOf(this)),
                    { serialize: false });
                return result;
            };
        }
        if (nodeData.name === "DFShowLayers") {
            const executed = nodeType.prototype.onExecuted;
            nodeType.prototype.onExecuted = function (message) {
                executed?.apply(this, arguments);
                showLayerList(this, (message?.text || []).join("\n"));
            };
            const serialize = nodeType.prototype.onSerialize;
            nodeType.prototype.onSerialize = function (data) {
                serialize?.apply(this, arguments);
                dropLayerList(this, data);
            };
        }
    },
});

// For tests and power users: open the picker on a node from the browser console.
window.diffusionFeaturePicker = { open: async (node) => openPicker(node, await familyOf(node)), familyOf };
