"""VMix (arXiv 2412.20800): aesthetic cross-attention mixing for AUTOMATIC1111 and Forge.

The always-on script only connects the WebUI's hooks to vmix_lib.webui; the work is done there.
"""
import modules.scripts as scripts

from vmix_lib.webui import app

_SUPPORTED = app.setup()


class VMixScript(scripts.Script):
    sorting_priority = 16  # Forge: place among the built-in accordions

    def title(self):
        return "VMix"

    def show(self, is_img2img):
        return scripts.AlwaysVisible if _SUPPORTED else False

    def ui(self, is_img2img):
        return app.build_ui(self)

    def process(self, p, *args):
        app.runner().process(p, args)

    # Hook the UNet right before it samples.  A1111 1.10+ and Forge call
    # process_before_every_sampling (Forge twice in a hires pass); A1111 1.6-1.9 lacks it, so
    # process_batch (first pass, img2img) and before_hr (hires pass) do it there.  Idempotent.
    def process_batch(self, p, *args, **kwargs):
        app.runner().before_sampling(p)

    def before_hr(self, p, *args):
        app.runner().before_sampling(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        app.runner().before_sampling(p)

    # Before the batch's infotexts: a VMix that could not act (attention replaced without to_v) says so.
    def postprocess_batch(self, p, *args, **kwargs):
        app.runner().after_batch(p)

    def postprocess(self, p, processed, *args):
        app.runner().postprocess(p)
