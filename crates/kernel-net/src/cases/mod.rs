//! The table of named cases ([`CASES`]) and the loop that runs them in order: each case gets
//! the one device set up for the run ([`Ctx`]), returns the detail of its `ok` line or what
//! went wrong, and the first failure ends the run as `case NAME FAILED: ...`.
//!
//! This file only lists and runs cases; what each one does and checks is in the files by
//! theme: [`data`] (frames through both queues), [`api`] (the kernel's side of the IOTLB
//! API), [`transports`] (one vIOMMU, the kernel and vhost-user). A case must not print its
//! own `ok` line, and leaves the device usable for the next (its mappings undone).

use crate::args::KernelNetArgs;
use crate::error::KernelNetError;
use crate::layout::Pages;
use crate::net::Net;

pub mod api;
pub mod data;
pub mod transports;

/// What the cases share: the options, the device, the buffer pages.
pub struct Ctx<'a> {
    /// The options.
    pub args: &'a KernelNetArgs,
    /// The device every case but `no-mem-table` uses, set up once with ACCESS_PLATFORM.
    pub net: Net,
    /// Buffer pages, handed out round-robin across cases.
    pub pages: Pages,
}

/// One named case: run, it returns the detail of its `ok` line.
pub struct Case {
    /// Its name, as `case NAME: ok (...)` and `case NAME FAILED: ...` show it.
    pub name: &'static str,
    /// The case.
    pub run: fn(&mut Ctx<'_>) -> Result<String, KernelNetError>,
}

/// The cases, in the order they run.
pub const CASES: &[Case] = &[
    Case {
        name: "used-ring",
        run: data::used_ring,
    },
    Case {
        name: "tx-cold",
        run: data::tx_cold,
    },
    Case {
        name: "cross-page",
        run: data::cross_page,
    },
    Case {
        name: "rx",
        run: data::rx,
    },
    Case {
        name: "poison",
        run: data::poison,
    },
    Case {
        name: "prepush",
        run: data::prepush,
    },
    Case {
        name: "msg-format",
        run: api::msg_format,
    },
    Case {
        name: "write-rules",
        run: api::write_rules,
    },
    Case {
        name: "update-no-replace",
        run: api::update_no_replace,
    },
    Case {
        name: "invalidate-whole",
        run: api::invalidate_whole,
    },
    Case {
        name: "capacity",
        run: api::capacity,
    },
    Case {
        name: "set-features",
        run: api::set_features,
    },
    Case {
        name: "invalidate-all",
        run: api::invalidate_all,
    },
    Case {
        name: "no-mem-table",
        run: api::no_mem_table,
    },
    Case {
        name: "both-transports",
        run: transports::both_transports,
    },
];

/// Run every case of [`CASES`] in order, printing `case NAME: ok (DETAIL)` for each; stop at
/// the first failure.
pub fn run_all(ctx: &mut Ctx<'_>) -> Result<(), KernelNetError> {
    for case in CASES {
        let detail = (case.run)(ctx).map_err(|e| KernelNetError::Case {
            name: case.name,
            source: Box::new(e),
        })?;
        println!("case {}: ok ({detail})", case.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::CASES;

    #[test]
    fn fifteen_cases_with_distinct_names() {
        let mut names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
        assert_eq!(names.len(), 15);
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 15);
    }
}
