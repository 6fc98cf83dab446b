/* vit_kernels._bound_launch: the bound launch of ops/_launcher.py, in C.

Why. Once a kernel's signature is bound, ops/_launcher.Launcher does per call what JITFunction.run
would redo: order the arguments, key them (a pointer by its dtype and 16-byte alignment, an int by
its value, a bool by its value, a float by its type, a constexpr or launch option by its value),
look the compiled kernel up, ask the driver for the device and stream, and call the kernel's C
launcher. In Python that is a few microseconds a launch, at ~27 arguments an attention launch
about 7 us (scripts/host_overhead.py), and a ViT step makes ~110. This does the same work in C
and builds the very same signature tuple, so it shares the Launcher's table of bound kernels:
the Launcher binds (its first launch of a signature goes through Triton), this only reads.

`BoundLauncher(fallback, positions, defaults, no_default, bound, launcher_module, hooks_installed,
traced)` is called like the Launcher: `(grid, *args, **kwargs)`. It launches when every argument
has the type its role expects, no launch hook is installed, nothing is being traced, and the
table holds the signature for the current device; otherwise it hands the call, unchanged, to
`fallback` (the Launcher's own path), which launches, binds or raises as before. Once it has
called a C launcher it never falls back: an error there propagates, so nothing launches twice.
No CUDA and no torch header: the tensors are asked for `dtype` and `data_ptr()` like Python does.

`check_signature(args, tensor_type)` is the other per-call cost of an op's host path that this
module takes: the signature on which _validate.checked_once keys a passed input check (about
2.4 us in Python for add + LayerNorm's seven arguments).
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>

#define MAX_PARAMS 128

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *fallback;        /* the Launcher's own path, same arguments */
    PyObject *positions;       /* dict: parameter name -> index */
    PyObject *defaults;        /* tuple: each parameter's default, or no_default */
    PyObject *no_default;
    PyObject *bound;           /* dict: (device, signature) -> (run, function, metadata) */
    PyObject *launcher_module; /* ops._launcher: its `driver`, read per call as the Launcher does */
    PyObject *hooks_installed; /* callable -> bool */
    PyObject *traced;          /* _dispatch.TRACED_LAUNCHES: its `on` */
    Py_ssize_t n_params;
    char roles[MAX_PARAMS];    /* per parameter: c constexpr, p pointer, i int, b bool, f float */
    int has_roles;
} BoundLauncher;

static PyObject *str_on, *str_dtype, *str_data_ptr, *str_driver, *str_active, *str_get_current_device,
    *str_get_current_stream, *str_shape, *str_stride, *str_device;

/* The key of one argument by its role, a new reference; NULL without an error where the argument
   does not have the role's type (the call then takes the fallback). */
static PyObject *argument_key(char role, PyObject *value) {
    switch (role) {
    case 'c':
        Py_INCREF(value);
        return value;
    case 'i':
        if (!PyLong_CheckExact(value)) return NULL;
        Py_INCREF(value);
        return value;
    case 'b':
        if (!PyBool_Check(value)) return NULL;
        Py_INCREF(value);
        return value;
    case 'f':
        if (!PyFloat_CheckExact(value)) return NULL;
        Py_RETURN_TRUE;
    case 'p': {
        if (value == Py_None) Py_RETURN_NONE;
        PyObject *dtype = PyObject_GetAttr(value, str_dtype);
        if (dtype == NULL) {
            PyErr_Clear();
            return NULL;
        }
        PyObject *address = PyObject_CallMethodNoArgs(value, str_data_ptr);
        if (address == NULL || !PyLong_Check(address)) {
            PyErr_Clear();
            Py_DECREF(dtype);
            Py_XDECREF(address);
            return NULL;
        }
        unsigned long long bits = PyLong_AsUnsignedLongLongMask(address);
        Py_DECREF(address);
        if (bits == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            Py_DECREF(dtype);
            return NULL;
        }
        PyObject *key = PyTuple_Pack(2, dtype, (bits & 15) == 0 ? Py_True : Py_False);
        Py_DECREF(dtype);
        return key;
    }
    }
    return NULL;
}

/* The launch if it can be made here: Py_None (launched), or NULL with no error set (take the
   fallback), or NULL with an error (from the C launcher: propagate). */
static PyObject *try_launch(BoundLauncher *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    if (!self->has_roles || nargs < 1 || PyDict_GET_SIZE(self->bound) == 0) return NULL;
    PyObject *grid = args[0];
    if (!PyTuple_CheckExact(grid) || PyTuple_GET_SIZE(grid) < 1 || PyTuple_GET_SIZE(grid) > 3) return NULL;
    Py_ssize_t n = self->n_params, n_positional = nargs - 1;
    if (n_positional > n) return NULL;

    PyObject *on = PyObject_GetAttr(self->traced, str_on);
    if (on == NULL) {
        PyErr_Clear();
        return NULL;
    }
    int tracing = PyObject_IsTrue(on);
    Py_DECREF(on);
    if (tracing != 0) {
        PyErr_Clear();
        return NULL;
    }

    PyObject *values[MAX_PARAMS];
    for (Py_ssize_t i = 0; i < n; i++) values[i] = i < n_positional ? args[1 + i] : NULL;
    Py_ssize_t n_kwargs = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames), n_options = 0;
    Py_ssize_t options_at[MAX_PARAMS];
    if (n_kwargs > MAX_PARAMS) return NULL;
    for (Py_ssize_t k = 0; k < n_kwargs; k++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, k);
        PyObject *position = PyDict_GetItemWithError(self->positions, name);
        if (position == NULL) {
            if (PyErr_Occurred()) {
                PyErr_Clear();
                return NULL;
            }
            options_at[n_options++] = k;
            continue;
        }
        Py_ssize_t i = PyLong_AsSsize_t(position);
        if (i < 0 || i >= n || values[i] != NULL) {  /* given twice: the fallback raises as Python does */
            PyErr_Clear();
            return NULL;
        }
        values[i] = args[nargs + k];
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (values[i] == NULL) {
            PyObject *fallback_value = PyTuple_GET_ITEM(self->defaults, i);
            if (fallback_value == self->no_default) return NULL;  /* missing: the fallback raises */
            values[i] = fallback_value;
        }
    }

    /* The binder's signature: (each parameter's key..., ((option, value), ...)). */
    PyObject *signature = PyTuple_New(n + 1);
    if (signature == NULL) {
        PyErr_Clear();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = argument_key(self->roles[i], values[i]);
        if (key == NULL) {
            Py_DECREF(signature);
            return NULL;
        }
        PyTuple_SET_ITEM(signature, i, key);
    }
    PyObject *options = PyTuple_New(n_options);
    if (options == NULL) {
        PyErr_Clear();
        Py_DECREF(signature);
        return NULL;
    }
    PyTuple_SET_ITEM(signature, n, options);
    for (Py_ssize_t j = 0; j < n_options; j++) {
        Py_ssize_t k = options_at[j];
        PyObject *item = PyTuple_Pack(2, PyTuple_GET_ITEM(kwnames, k), args[nargs + k]);
        if (item == NULL) {
            PyErr_Clear();
            Py_DECREF(signature);
            return NULL;
        }
        PyTuple_SET_ITEM(options, j, item);
    }

    PyObject *result = NULL, *driver = NULL, *active = NULL, *device = NULL, *key = NULL, *stream = NULL;
    PyObject *hooks = PyObject_CallNoArgs(self->hooks_installed);
    int hooked = hooks == NULL ? -1 : PyObject_IsTrue(hooks);
    Py_XDECREF(hooks);
    if (hooked != 0) goto miss;
    driver = PyObject_GetAttr(self->launcher_module, str_driver);
    if (driver == NULL) goto miss;
    active = PyObject_GetAttr(driver, str_active);
    if (active == NULL) goto miss;
    device = PyObject_CallMethodNoArgs(active, str_get_current_device);
    if (device == NULL) goto miss;
    key = PyTuple_Pack(2, device, signature);
    if (key == NULL) goto miss;
    PyObject *entry = PyDict_GetItemWithError(self->bound, key);  /* borrowed */
    if (entry == NULL || !PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 3) goto miss;
    Py_INCREF(entry);  /* the table may drop it while the launcher runs */
    stream = PyObject_CallMethodOneArg(active, str_get_current_stream, device);
    if (stream == NULL) {
        Py_DECREF(entry);
        goto miss;
    }

    PyObject *one = PyLong_FromLong(1);
    PyObject *stack[9 + MAX_PARAMS];
    Py_ssize_t n_grid = PyTuple_GET_SIZE(grid);
    stack[0] = PyTuple_GET_ITEM(grid, 0);
    stack[1] = n_grid > 1 ? PyTuple_GET_ITEM(grid, 1) : one;
    stack[2] = n_grid > 2 ? PyTuple_GET_ITEM(grid, 2) : one;
    stack[3] = stream;
    stack[4] = PyTuple_GET_ITEM(entry, 1);
    stack[5] = PyTuple_GET_ITEM(entry, 2);
    stack[6] = stack[7] = stack[8] = Py_None;
    for (Py_ssize_t i = 0; i < n; i++) stack[9 + i] = values[i];
    PyObject *ran = PyObject_Vectorcall(PyTuple_GET_ITEM(entry, 0), stack, 9 + n, NULL);
    Py_DECREF(one);
    Py_DECREF(entry);
    if (ran != NULL) {
        Py_DECREF(ran);
        Py_INCREF(Py_None);
        result = Py_None;
    }
    /* ran == NULL: the C launcher raised; result stays NULL with its error set */
    goto done;

miss:
    PyErr_Clear();
done:
    Py_XDECREF(stream);
    Py_XDECREF(key);
    Py_XDECREF(device);
    Py_XDECREF(active);
    Py_XDECREF(driver);
    Py_DECREF(signature);
    return result;
}

static PyObject *bound_launcher_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                                           PyObject *kwnames) {
    BoundLauncher *self = (BoundLauncher *)callable;
    PyObject *launched = try_launch(self, args, PyVectorcall_NARGS(nargsf), kwnames);
    if (launched != NULL || PyErr_Occurred()) return launched;
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static PyObject *bound_launcher_set_roles(BoundLauncher *self, PyObject *roles) {
    if (!PyUnicode_Check(roles)) {
        PyErr_SetString(PyExc_TypeError, "roles must be a str");
        return NULL;
    }
    Py_ssize_t size;
    const char *text = PyUnicode_AsUTF8AndSize(roles, &size);
    if (text == NULL) return NULL;
    if (size != self->n_params) {
        PyErr_Format(PyExc_ValueError, "roles has %zd entries for %zd parameters", size, self->n_params);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < size; i++) {
        if (strchr("cpibf", text[i]) == NULL || text[i] == '\0') {
            PyErr_Format(PyExc_ValueError, "unknown role %c", text[i]);
            return NULL;
        }
        self->roles[i] = text[i];
    }
    self->has_roles = 1;
    Py_RETURN_NONE;
}

static int bound_launcher_init(BoundLauncher *self, PyObject *args, PyObject *kwargs) {
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "BoundLauncher takes positional arguments only");
        return -1;
    }
    PyObject *fallback, *positions, *defaults, *no_default, *bound, *launcher_module, *hooks_installed, *traced;
    if (!PyArg_ParseTuple(args, "OO!O!OO!OOO:BoundLauncher", &fallback, &PyDict_Type, &positions, &PyTuple_Type,
                          &defaults, &no_default, &PyDict_Type, &bound, &launcher_module, &hooks_installed,
                          &traced))
        return -1;
    if (PyTuple_GET_SIZE(defaults) > MAX_PARAMS || PyDict_GET_SIZE(positions) != PyTuple_GET_SIZE(defaults)) {
        PyErr_SetString(PyExc_ValueError, "positions and defaults must name the same parameters (at most 128)");
        return -1;
    }
    PyObject *fields[] = {fallback, positions, defaults, no_default, bound, launcher_module, hooks_installed, traced};
    PyObject **slots[] = {&self->fallback, &self->positions, &self->defaults, &self->no_default, &self->bound,
                          &self->launcher_module, &self->hooks_installed, &self->traced};
    for (int i = 0; i < 8; i++) {
        Py_INCREF(fields[i]);
        Py_XSETREF(*slots[i], fields[i]);
    }
    self->n_params = PyTuple_GET_SIZE(defaults);
    self->has_roles = 0;
    self->vectorcall = bound_launcher_vectorcall;
    return 0;
}

static int bound_launcher_traverse(BoundLauncher *self, visitproc visit, void *arg) {
    Py_VISIT(self->fallback);
    Py_VISIT(self->positions);
    Py_VISIT(self->defaults);
    Py_VISIT(self->no_default);
    Py_VISIT(self->bound);
    Py_VISIT(self->launcher_module);
    Py_VISIT(self->hooks_installed);
    Py_VISIT(self->traced);
    return 0;
}

static int bound_launcher_clear(BoundLauncher *self) {
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->positions);
    Py_CLEAR(self->defaults);
    Py_CLEAR(self->no_default);
    Py_CLEAR(self->bound);
    Py_CLEAR(self->launcher_module);
    Py_CLEAR(self->hooks_installed);
    Py_CLEAR(self->traced);
    return 0;
}

static void bound_launcher_dealloc(BoundLauncher *self) {
    PyObject_GC_UnTrack(self);
    bound_launcher_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *bound_launcher_call(PyObject *callable, PyObject *args, PyObject *kwargs) {
    return PyVectorcall_Call(callable, args, kwargs);
}

static PyMethodDef bound_launcher_methods[] = {
    {"set_roles", (PyCFunction)bound_launcher_set_roles, METH_O,
     "set_roles(roles): each parameter's role, one letter each (c constexpr, p pointer, i int, b bool, f float); "
     "until set, every call takes the fallback"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject BoundLauncherType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vit_kernels._bound_launch.BoundLauncher",
    .tp_basicsize = sizeof(BoundLauncher),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A Launcher's bound launches in C (csrc/bound_launch.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)bound_launcher_init,
    .tp_dealloc = (destructor)bound_launcher_dealloc,
    .tp_traverse = (traverseproc)bound_launcher_traverse,
    .tp_clear = (inquiry)bound_launcher_clear,
    .tp_call = bound_launcher_call,
    .tp_vectorcall_offset = offsetof(BoundLauncher, vectorcall),
    .tp_methods = bound_launcher_methods,
};

/* _validate.checked_once's signature of `args` (a tuple), the Python one's equal: for each argument, a
   tensor (an instance of tensor_type) as (type, shape, stride(), dtype, device), anything else as
   (type, value). An error propagates (the caller then runs the check every time). */
static PyObject *check_signature(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyTuple_Check(args[0]) || !PyType_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "check_signature(args: tuple, tensor_type: type)");
        return NULL;
    }
    PyObject *values = args[0];
    PyTypeObject *tensor_type = (PyTypeObject *)args[1];
    Py_ssize_t n = PyTuple_GET_SIZE(values);
    PyObject *signature = PyTuple_New(n);
    if (signature == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = PyTuple_GET_ITEM(values, i), *key;
        PyObject *type = (PyObject *)Py_TYPE(value);
        if (PyObject_TypeCheck(value, tensor_type)) {
            PyObject *shape = PyObject_GetAttr(value, str_shape);
            PyObject *stride = shape == NULL ? NULL : PyObject_CallMethodNoArgs(value, str_stride);
            PyObject *dtype = stride == NULL ? NULL : PyObject_GetAttr(value, str_dtype);
            PyObject *device = dtype == NULL ? NULL : PyObject_GetAttr(value, str_device);
            key = device == NULL ? NULL : PyTuple_Pack(5, type, shape, stride, dtype, device);
            Py_XDECREF(shape);
            Py_XDECREF(stride);
            Py_XDECREF(dtype);
            Py_XDECREF(device);
        } else {
            key = PyTuple_Pack(2, type, value);
        }
        if (key == NULL) {
            Py_DECREF(signature);
            return NULL;
        }
        PyTuple_SET_ITEM(signature, i, key);
    }
    return signature;
}

static PyMethodDef module_methods[] = {
    {"check_signature", (PyCFunction)(void (*)(void))check_signature, METH_FASTCALL,
     "check_signature(args, tensor_type): the signature _validate.checked_once keys a passed check on"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_bound_launch", "Bound Triton launches in C (csrc/bound_launch.c).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__bound_launch(void) {
    const char *names[] = {"on", "dtype", "data_ptr", "driver", "active", "get_current_device", "get_current_stream",
                           "shape", "stride", "device"};
    PyObject **strings[] = {&str_on, &str_dtype, &str_data_ptr, &str_driver, &str_active, &str_get_current_device,
                            &str_get_current_stream, &str_shape, &str_stride, &str_device};
    for (int i = 0; i < 10; i++) {
        *strings[i] = PyUnicode_InternFromString(names[i]);
        if (*strings[i] == NULL) return NULL;
    }
    if (PyType_Ready(&BoundLauncherType) < 0) return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) return NULL;
    Py_INCREF(&BoundLauncherType);
    if (PyModule_AddObject(module, "BoundLauncher", (PyObject *)&BoundLauncherType) < 0) {
        Py_DECREF(&BoundLauncherType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
