"""Fixes for the Triton and NumPy versions the package supports, each applied only where the
installed version needs it (found in its source, not guessed from a version number), at the
import of the dispatch module, before any kernel runs."""

import inspect

from triton.runtime import interpreter


def mend_interpreter_index() -> bool:
    """Triton 3.6's interpreter turns a scalar tensor into a Python int (a loop bound, a range
    step) with `int(data)` of a one-element 1-D array, which NumPy 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"), so every kernel with a runtime
    loop bound failed under TRITON_INTERPRET beside the newest NumPy. Triton 3.8 squeezes the
    array first; this does the same where the interpreter has the old line (found in its
    source), and only there. Returns whether it mended."""
    patch_lang_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    try:
        buggy = "lambda self: int(self.handle.data))" in inspect.getsource(patch_lang_tensor)
    except (OSError, TypeError):
        return False
    if not buggy:
        return False

    def patch_lang_tensor_with_squeezed_index(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor_with_squeezed_index
    return True


mend_interpreter_index()
