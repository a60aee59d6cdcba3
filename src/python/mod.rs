//! Python bindings: the only module that uses PyO3.
