"""Driving the WebUI's page the way a user does (clicks, keystrokes) with selenium, for tests/e2e.

Element ids are the WebUI's own (txt2img_prompt, txt2img_generate, html_info_txt2img, paste, ...,
the same in AUTOMATIC1111 1.10 and Forge) and VMix's ``script_<tab>_vmix_<name>``.  Works with the
DOM of gradio 3.41 (A1111) and 4.40 (Forge): dropdown options are ``li[data-testid=dropdown-option]``
with the choice in aria-label, sliders have a number box, the accordion's visible check box is the
one the WebUI's inputAccordion.js adds.
"""
from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.request
from typing import Callable, Dict, List, Optional

from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

TIMEOUT = 60.0


class WebUIPage:
    def __init__(self, driver, url: str, out_dir: str):
        self.driver = driver
        self.url = url
        self.out_dir = out_dir
        self.report: List[str] = []
        self.shots = 0

    # -- basics --------------------------------------------------------------------------------
    def note(self, text: str) -> None:
        print(text)
        self.report.append(text)

    def write_report(self) -> None:
        with open(os.path.join(self.out_dir, "report.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(self.report) + "\n")

    def wait(self, condition: Callable[[], object], what: str, timeout: float = TIMEOUT):
        end = time.time() + timeout
        last: Optional[BaseException] = None
        while time.time() < end:
            try:
                value = condition()
                if value:
                    return value
            except (StaleElementReferenceException, WebDriverException) as e:
                last = e
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" ({last})" if last else ""))

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def vid(self, tab: str, name: str) -> str:
        return f"script_{tab}_vmix_{name}"

    def open(self) -> None:
        self.driver.get(self.url + "/")
        self.wait_ready()
        versions = self.js("const v = document.querySelector('.versions'); return v ? v.textContent : '';") or ""
        self.kind = "forge neo" if "version: neo" in versions else "forge" if "version: f" in versions else "a1111"
        self.note(f"WebUI at {self.url}: {self.kind}; {' '.join(versions.split())}")

    def wait_ready(self) -> None:
        self.wait(lambda: self.finds("#txt2img_generate"), "the WebUI page", 180)
        # javascript/vmix.js has run once the VMix elements carry their hints
        self.wait(lambda: self.js(
            "const e = document.getElementById(arguments[0]); return e && e.title;", self.vid("txt2img", "strength")),
            "the VMix hover hints", 60)

    def screenshot(self, name: str, css: Optional[str] = None) -> str:
        self.shots += 1
        path = os.path.join(self.out_dir, f"{self.shots:02d}-{name}.png")
        if css:
            element = self.find(css)
            self.js("arguments[0].scrollIntoView({block: 'center'});", element)
            time.sleep(0.3)
            element.screenshot(path)
        else:
            self.driver.save_screenshot(path)
        self.note(f"  screenshot {path}")
        return path

    def console_errors(self) -> List[str]:
        try:
            return [e["message"] for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]
        except WebDriverException:
            return []

    # -- HTTP API ------------------------------------------------------------------------------
    def api_json(self, path: str, payload: Optional[dict] = None, timeout: float = 600):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def api_image(self, payload: dict):
        from PIL import Image

        result = self.api_json("/sdapi/v1/txt2img", payload)
        return Image.open(io.BytesIO(base64.b64decode(result["images"][0]))).convert("RGB"), result

    # -- controls ------------------------------------------------------------------------------
    def go_tab(self, tab: str) -> None:
        buttons = [b for b in self.finds("#tabs > .tab-nav button, #tabs button") if b.text.strip().lower() == tab]
        if buttons:
            buttons[0].click()
        self.wait(lambda: self.find(f"#{self.vid(tab, 'info')}").is_displayed() or self.find(f"#tab_{tab}").is_displayed(),
                  f"the {tab} tab")

    def accordion_open(self, tab: str) -> bool:
        return bool(self.js("const h = document.querySelector('#' + arguments[0] + ' .label-wrap');"
                            " return h && h.classList.contains('open');", self.vid(tab, "enabled")))

    def enabled(self, tab: str) -> bool:
        return bool(self.js("const c = document.getElementById(arguments[0] + '-visible-checkbox'); return c && c.checked;",
                            self.vid(tab, "enabled")))

    def set_enabled(self, tab: str, on: bool) -> None:
        """Open (and so enable) or close the accordion by its header, as a user does."""
        if self.enabled(tab) == on and self.accordion_open(tab) == on:
            return
        header = self.find(f"#{self.vid(tab, 'enabled')} .label-wrap")
        self.js("arguments[0].scrollIntoView({block: 'center'});", header)
        if self.accordion_open(tab) != on:
            header.click()
        if self.enabled(tab) != on:
            self.find(f"#{self.vid(tab, 'enabled')}-visible-checkbox").click()
        self.wait(lambda: self.enabled(tab) == on, f"VMix {'on' if on else 'off'} in {tab}")

    def adapter_box(self, tab: str):
        return self.find(f"#{self.vid(tab, 'adapter')} input")

    def adapter_value(self, tab: str) -> str:
        return self.adapter_box(tab).get_attribute("value")

    def adapter_choices(self, tab: str) -> List[str]:
        box = self.adapter_box(tab)
        box.click()
        options = self.wait(lambda: self.finds(f"#{self.vid(tab, 'adapter')} li[data-testid='dropdown-option']"),
                            "the adapter list")
        names = [o.get_attribute("aria-label") for o in options]
        box.send_keys(Keys.ESCAPE)
        self.blur()
        return names

    def adapter_marks(self, tab: str) -> Dict[str, str]:
        """{name: the CSS content after the list item} for the adapter list's items (javascript/vmix.js
        marks files that fail the full check; "none" or "normal" where there is no mark)."""
        box = self.adapter_box(tab)
        box.click()
        options = self.wait(lambda: self.finds(f"#{self.vid(tab, 'adapter')} li[data-testid='dropdown-option']"),
                            "the adapter list")
        marks = {o.get_attribute("aria-label"): self.js("return getComputedStyle(arguments[0], '::after').content;", o)
                 for o in options}
        box.send_keys(Keys.ESCAPE)
        self.blur()
        return marks

    def blur(self) -> None:
        self.js("document.activeElement && document.activeElement.blur();")

    def pick_adapter(self, tab: str, name: str) -> None:
        box = self.adapter_box(tab)
        self.js("arguments[0].scrollIntoView({block: 'center'});", box)
        box.click()
        option = self.wait(lambda: [o for o in self.finds(f"#{self.vid(tab, 'adapter')} li[data-testid='dropdown-option']")
                                    if o.get_attribute("aria-label") == name], f"adapter {name!r} in the list")[0]
        option.click()
        self.wait(lambda: self.adapter_value(tab) == name, f"adapter {name!r} selected")
        self.wait(lambda: self.described(tab) == name, f"the info line of adapter {name!r}")

    def described(self, tab: str) -> Optional[str]:
        """The adapter the info line describes (the server's answer has arrived)."""
        return self.js("const e = document.querySelector('#' + arguments[0] + ' [data-vmix-adapter]');"
                       " return e ? e.getAttribute('data-vmix-adapter') : null;", self.vid(tab, "info"))

    def type_in_adapter_box(self, tab: str, text: str, leave: bool = False) -> None:
        box = self.adapter_box(tab)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        for ch in text:
            box.send_keys(ch)
            time.sleep(0.15)
        if leave:
            box.send_keys(Keys.ESCAPE)
            self.blur()

    def info(self, tab: str) -> str:
        return self.find(f"#{self.vid(tab, 'info')} .vmix-info").text

    def number_box(self, element_id: str):
        return self.find(f"#{element_id} input[type='number']")

    def slider_value(self, element_id: str) -> float:
        return float(self.number_box(element_id).get_attribute("value"))

    def set_slider(self, element_id: str, value: float) -> None:
        box = self.number_box(element_id)
        self.js("arguments[0].scrollIntoView({block: 'center'});", box)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value))
        box.send_keys(Keys.TAB)
        self.wait(lambda: abs(self.slider_value(element_id) - value) < 1e-9, f"{element_id} = {value}")

    def textbox(self, element_id: str):
        return self.find(f"#{element_id} textarea, #{element_id} input[type='text']")

    def set_text(self, element_id: str, text: str) -> None:
        box = self.textbox(element_id)
        self.js("arguments[0].scrollIntoView({block: 'center'});", box)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        if text:
            box.send_keys(text)
        box.send_keys(Keys.TAB)

    def visible_alphas(self, tab: str) -> List[Dict[str, object]]:
        """Label, title and box of each visible α slider."""
        return self.js("""
            const out = [];
            for (let i = 1; i <= 8; i++) {
                const e = document.getElementById(arguments[0] + i);
                if (!e || e.offsetParent === null) continue;
                const r = e.getBoundingClientRect();
                const label = e.querySelector('[data-testid="block-info"], label span, .head span');
                const span = label ? label.getBoundingClientRect() : r;
                out.push({slot: i, label: label ? label.textContent.trim() : '', title: e.title,
                          x: r.left, y: r.top, w: r.width, h: r.height, label_h: span.height});
            }
            return out;""", self.vid(tab, "alpha_"))

    # -- generation ----------------------------------------------------------------------------
    def generate(self, tab: str = "txt2img", prompt: str = "a lighthouse at dusk", expect: str = "Steps:",
                 timeout: float = 900) -> str:
        """Click Generate and return the infotext (or the error text) shown under the gallery."""
        before = self.find(f"#html_info_{tab}").text
        self.set_text(f"{tab}_prompt", prompt)
        self.find(f"#{tab}_generate").click()

        def done():
            text = self.find(f"#html_info_{tab}").text
            log = self.finds(f"#html_log_{tab}")
            log_text = log[0].text if log else ""
            if expect in text and text != before:
                return text
            if "Error" in log_text or "VMix" in log_text:
                # without the WebUI's timing line (Forge Neo shows "Time taken: …" in the same element)
                return "\n".join(line for line in log_text.splitlines() if not line.startswith("Time taken:"))
            return None

        return self.wait(done, f"the {tab} result", timeout)

    def reload_ui(self) -> None:
        """Settings > Reload UI (the footer link does the same): scripts unload, the page rebuilds."""
        old = self.find("#txt2img_generate")
        self.js("gradioApp().getElementById('settings_restart_gradio').click();")
        self.wait(lambda: _stale(old), "the page to go away", 120)
        self.wait_ready()


def _stale(element) -> bool:
    try:
        element.is_displayed()
        return False
    except StaleElementReferenceException:
        return True
