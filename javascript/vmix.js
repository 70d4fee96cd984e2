// VMix: hover hints for the VMix accordion in txt2img and img2img (AUTOMATIC1111 with gradio 3.41,
// Forge with gradio 4.40).  Like the WebUI's own javascript/hints.js this sets the `title` of
// controls, which the browser shows on hover.  The texts follow the selected adapter, so the server
// sends them with the info line: a hidden element with a data-vmix-hints attribute holding
// {element id suffix: text}.  Only the elements whose id is the info line's prefix
// ("script_txt2img_vmix_") plus such a suffix are touched; no other extension's element is.
//
// The same element's data-vmix-marks holds {adapter name: mark} for files that fail the full check.
// The adapter list shows them as "name ⚠ damaged": one <style> per tab whose rules put the mark
// after the list items of that tab's adapter dropdown whose aria-label is the name (gradio 3.41
// and 4.40 both render <li class="item" aria-label="<name>">).  CSS, not text in the items: the
// choices and the dropdown's value stay the plain names, and gradio re-renders the list freely.

(function() {
    var pending = null;

    function target(element) {
        // The accordion's hint goes on its header (the visible check box and label), not on its body.
        if (element.classList.contains("input-accordion")) {
            return element.querySelector(".label-wrap") || element;
        }
        return element;
    }

    function cssString(text) {
        return '"' + String(text).replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/[\n\r\f]/g, " ") + '"';
    }

    function marksCss(prefix, marks) {
        var css = "";
        for (var name in marks) {
            css += "#" + prefix + "adapter li.item[aria-label=" + cssString(name) + "]::after { content: " +
                cssString(marks[name]) + "; }\n";
        }
        return css;
    }

    function applyMarks(prefix, marks) {
        var id = prefix + "list_marks";
        var style = document.getElementById(id);
        if (!style) {
            style = document.createElement("style");
            style.id = id;
            document.head.appendChild(style);
        }
        var css = marksCss(prefix, marks);
        if (style.textContent !== css) style.textContent = css;
    }

    function applyVMixHints() {
        pending = null;
        var app = gradioApp();
        var carriers = app.querySelectorAll("[data-vmix-hints]");
        for (var i = 0; i < carriers.length; i++) {
            var block = carriers[i].closest("[id$='_vmix_info']");
            if (!block) continue;
            var prefix = block.id.slice(0, -"info".length);
            var hints, marks;
            try {
                hints = JSON.parse(carriers[i].getAttribute("data-vmix-hints"));
                marks = JSON.parse(carriers[i].getAttribute("data-vmix-marks") || "{}");
            } catch (e) {
                continue;
            }
            applyMarks(prefix, marks);
            for (var key in hints) {
                var element = app.querySelector("#" + prefix + key);
                if (!element) continue;
                element = target(element);
                if (element.title !== hints[key]) element.title = hints[key];
            }
        }
    }

    // Gradio re-renders parts of the page (an adapter change relabels the α sliders and replaces the
    // info line): apply again shortly after the page changes, at most once per 200 ms.
    onUiUpdate(function() {
        if (pending === null) pending = setTimeout(applyVMixHints, 200);
    });
    onUiLoaded(applyVMixHints);
})();

// The VMix tab (vmix_lib/webui/making/tab.py): Train and Resume start a job the way A1111's own Train
// tab does (textualInversion.js): a task id for the progress bar, which polls /internal/progress and
// shows shared.state's text and the newest λ-sweep preview (as the live preview) while the job runs.
function make_vmix_start() {
    var app = gradioApp();
    var id = randomId();
    // The bar shows shared.state.textinfo (step, loss, direction) itself; nothing is written into the
    // job's output elements, which gradio fills when the job returns.
    requestProgress(id, app.getElementById("make_vmix_progress"), app.getElementById("make_vmix_preview"), function() {});
    var args = Array.from(arguments);
    args[0] = id;
    return args;
}
