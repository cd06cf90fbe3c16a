//! The `deriva` client commands (to come).
