// Markdown for answers: marked (GFM) with $…$, $$…$$, \(…\) and \[…\] rendered by KaTeX, then everything
// sanitised by DOMPurify, since the text comes from a model. Code blocks get a header with a copy button.

const { marked, DOMPurify, katex } = window;

function tex(source, displayMode) {
  try {
    return katex.renderToString(source, { displayMode, throwOnError: false, strict: "ignore", trust: false });
  } catch (e) {
    const code = document.createElement("code");
    code.textContent = source;
    return code.outerHTML;
  }
}

// Extensions run before marked's own tokenizers, so math is taken out before `_` or `*` can become emphasis;
// code spans and fences are tokenized first at their own positions, so `$` inside code stays text.
const mathExtension = {
  extensions: [
    {
      name: "mathBlock",
      level: "block",
      start(src) { const i = src.search(/\$\$|\\\[/); return i < 0 ? undefined : i; },
      tokenizer(src) {
        const m = /^\$\$([\s\S]+?)\$\$[^\S\n]*(?:\n|$)/.exec(src) || /^\\\[([\s\S]+?)\\\][^\S\n]*(?:\n|$)/.exec(src);
        if (m) return { type: "mathBlock", raw: m[0], text: m[1].trim() };
        return undefined;
      },
      renderer(token) { return `<div class="math-block">${tex(token.text, true)}</div>\n`; },
    },
    {
      name: "mathInline",
      level: "inline",
      start(src) { const i = src.search(/\$|\\\(/); return i < 0 ? undefined : i; },
      tokenizer(src) {
        let m = /^\$\$([\s\S]+?)\$\$/.exec(src);
        if (m) return { type: "mathInline", raw: m[0], text: m[1].trim(), display: true };
        m = /^\\\(([\s\S]+?)\\\)/.exec(src);
        if (m) return { type: "mathInline", raw: m[0], text: m[1], display: false };
        // $x$: no space just inside the dollars and no digit right after, so "$5 and $10" stays text.
        m = /^\$(?![\s$])((?:\\\$|[^$\n])+?)(?<![\s\\])\$(?!\d)/.exec(src);
        if (m) return { type: "mathInline", raw: m[0], text: m[1], display: false };
        return undefined;
      },
      renderer(token) { return tex(token.text, token.display); },
    },
  ],
};

marked.use({ gfm: true, breaks: false }, mathExtension);

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.getAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

export function renderMarkdown(text) {
  const html = marked.parse(text || "");
  return DOMPurify.sanitize(html, { ADD_ATTR: ["target"] });
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch (e) {
    // No clipboard API (plain http on a LAN address): fall back to a hidden textarea.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    let ok = false;
    try { ok = document.execCommand("copy"); } catch (e2) { ok = false; }
    area.remove();
    return ok;
  }
}

export function copyButton(getText, testid, label = "Copy") {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "btn btn-small";
  button.dataset.testid = testid;
  button.textContent = label;
  button.addEventListener("click", async () => {
    const ok = await copyText(getText());
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = label; }, 1500);
  });
  return button;
}

// Puts markdown into `el` and gives each code block a header with its language and a copy button.
export function setMarkdown(el, text) {
  el.innerHTML = renderMarkdown(text);
  for (const pre of el.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    const lang = code && (/(?:^|\s)language-([\w+#.-]+)/.exec(code.className) || [])[1];
    const block = document.createElement("div");
    block.className = "code-block";
    const head = document.createElement("div");
    head.className = "code-head";
    const name = document.createElement("span");
    name.textContent = lang || "code";
    head.append(name, copyButton(() => (code || pre).textContent, "copy-code"));
    pre.replaceWith(block);
    block.append(head, pre);
  }
}
