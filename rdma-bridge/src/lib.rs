//! Placeholder: built in a later issue (see DESIGN.md).
