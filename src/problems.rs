//! One collector for configuration problems: each owner's validation reports what it
//! finds (the key path and what is wrong) through it, and asks it whether anything was
//! wrong instead of keeping its own `ok` flag. The caller decides what a report does
//! (`config::validate` collects them all, for `check` to print one per line).

/// Problems reported so far by one validation, passed on to the caller's reporter.
pub struct Problems<'a> {
    report: &'a mut dyn FnMut(String, String),
    count: usize,
}

impl<'a> Problems<'a> {
    /// Reports through `report` (key path, message).
    pub fn new(report: &'a mut dyn FnMut(String, String)) -> Self {
        Problems { report, count: 0 }
    }

    /// Reports a problem at key path `key`.
    pub fn add(&mut self, key: String, message: String) {
        self.count += 1;
        (self.report)(key, message);
    }

    /// Whether nothing was reported through this collector.
    pub fn none(&self) -> bool {
        self.count == 0
    }

    /// How many were reported: a validation step compares it before and after.
    pub fn count(&self) -> usize {
        self.count
    }

    /// A reporter for a helper that takes one; what it reports counts here.
    pub fn reporter(&mut self) -> impl FnMut(String, String) + use<'_, 'a> {
        |key, message| self.add(key, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_it_passes_on() {
        let mut seen = Vec::new();
        let mut collect = |k: String, m: String| seen.push(format!("{k}: {m}"));
        let mut problems = Problems::new(&mut collect);
        assert!(problems.none());
        problems.add("a.b".into(), "wrong".into());
        (problems.reporter())("a.c".into(), "also wrong".into());
        assert_eq!(problems.count(), 2);
        assert!(!problems.none());
        assert_eq!(seen, ["a.b: wrong", "a.c: also wrong"]);
    }
}
