//! What `ListOperations` asks for (sans-IO): the request's `name` as a prefix of operation
//! names, a `filter` of stages (`stage=EXECUTING` or `stage=QUEUED,EXECUTING`; Kiln's own small
//! grammar, since `google.longrunning` leaves filters to the server), and pages in name order,
//! each token naming the last operation of the page before.

use super::ops::OpView;
use kiln_proto::longrunning::ListOperationsRequest;
use kiln_proto::reapi::execution_stage::Value as StageValue;

/// Operations in a page unless the request asks for fewer.
pub const DEFAULT_PAGE: usize = 100;
/// Most operations in a page.
pub const MAX_PAGE: usize = 1000;
/// The token prefix (a version, so that a later format can be told apart).
const TOKEN: &str = "o1.";

/// A parsed `ListOperationsRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpQuery {
    /// Names must start with this.
    pub prefix: String,
    /// Stages wanted (`None`: all).
    pub stages: Option<Vec<StageValue>>,
    /// Names must come after this (the last of the previous page).
    pub after: Option<String>,
    /// Operations per page.
    pub page_size: usize,
}

/// Why a request was refused (`INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The filter is not `stage=STAGE[,STAGE…]`.
    #[error("filter {0:?} is not understood: use stage=QUEUED|CACHE_CHECK|EXECUTING|COMPLETED, several separated by commas")]
    Filter(String),
    /// The page token is not one this server gave.
    #[error("page_token {0:?} is not one this server gave")]
    Token(String),
    /// A negative page size.
    #[error("page_size {0} is negative")]
    PageSize(i32),
}

impl OpQuery {
    /// Parses a request.
    pub fn parse(request: &ListOperationsRequest) -> Result<OpQuery, QueryError> {
        let stages = match request.filter.trim() {
            "" => None,
            filter => {
                let list = filter
                    .strip_prefix("stage=")
                    .ok_or_else(|| QueryError::Filter(filter.to_string()))?;
                let stages = list
                    .split(',')
                    .map(|s| match s.trim() {
                        "QUEUED" => Ok(StageValue::Queued),
                        "CACHE_CHECK" => Ok(StageValue::CacheCheck),
                        "EXECUTING" => Ok(StageValue::Executing),
                        "COMPLETED" => Ok(StageValue::Completed),
                        _ => Err(QueryError::Filter(filter.to_string())),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some(stages)
            }
        };
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(
                token
                    .strip_prefix(TOKEN)
                    .ok_or_else(|| QueryError::Token(token.chars().take(100).collect()))?
                    .to_string(),
            ),
        };
        let page_size = match request.page_size {
            n if n < 0 => return Err(QueryError::PageSize(n)),
            0 => DEFAULT_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        Ok(OpQuery {
            prefix: request.name.clone(),
            stages,
            after,
            page_size,
        })
    }

    /// Whether an operation's name is in range (prefix, after the token).
    pub fn wants_name(&self, name: &str) -> bool {
        name.starts_with(&self.prefix) && self.after.as_deref().is_none_or(|a| name > a)
    }

    /// Whether an operation at `stage` is wanted.
    pub fn wants_stage(&self, stage: StageValue) -> bool {
        self.stages.as_ref().is_none_or(|s| s.contains(&stage))
    }

    /// The token that resumes after `last`.
    pub fn token_after(last: &str) -> String {
        format!("{TOKEN}{last}")
    }
}

/// The page `query` asks for of `candidates` (names in order, each with its view if it is
/// still there), keeping those at a wanted stage of instances `allowed` accepts; and the name
/// to resume after, when the page is full and more candidates remain.
pub fn page<'a>(
    query: &OpQuery,
    candidates: impl IntoIterator<Item = (&'a String, Option<OpView>)>,
    mut allowed: impl FnMut(&str) -> bool,
) -> (Vec<OpView>, Option<String>) {
    let mut page: Vec<OpView> = Vec::new();
    for (_, view) in candidates {
        if page.len() == query.page_size {
            let last = page.last().map(|v| v.name.clone());
            return (page, last);
        }
        if let Some(view) = view {
            if query.wants_stage(view.stage) && allowed(&view.instance) {
                page.push(view);
            }
        }
    }
    (page, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str, filter: &str, size: i32, token: &str) -> ListOperationsRequest {
        ListOperationsRequest {
            name: name.into(),
            filter: filter.into(),
            page_size: size,
            page_token: token.into(),
            ..Default::default()
        }
    }

    #[test]
    fn queries_parse_and_select() {
        let q = OpQuery::parse(&request("operations/", "stage=QUEUED, EXECUTING", 0, "")).unwrap();
        assert_eq!(q.page_size, DEFAULT_PAGE);
        assert!(q.wants_stage(StageValue::Executing) && !q.wants_stage(StageValue::Completed));
        assert!(q.wants_name("operations/b") && !q.wants_name("other/b"));
        let token = OpQuery::token_after("operations/b");
        let next = OpQuery::parse(&request("", "", 5000, &token)).unwrap();
        assert_eq!(next.page_size, MAX_PAGE);
        assert!(!next.wants_name("operations/a") && !next.wants_name("operations/b"));
        assert!(next.wants_name("operations/c"));
        assert!(OpQuery::parse(&request("", "", 1, ""))
            .unwrap()
            .wants_stage(StageValue::Queued));
    }

    #[test]
    fn bad_requests_are_refused() {
        for (filter, size, token) in [
            ("done=true", 0, ""),
            ("stage=RUNNING", 0, ""),
            ("", -1, ""),
            ("", 0, "nonsense"),
        ] {
            assert!(
                OpQuery::parse(&request("", filter, size, token)).is_err(),
                "{filter} {size} {token}"
            );
        }
    }
}
