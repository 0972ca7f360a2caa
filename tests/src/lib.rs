//! Shared harness for the privileged integration tests.
