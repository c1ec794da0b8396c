//! Admission control (see DESIGN.md, "Guard semantics").
