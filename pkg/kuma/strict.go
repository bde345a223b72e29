package kuma

// encoding/json matches object keys to struct fields ignoring case, even with
// DisallowUnknownFields, so {"LIMIT": 5} would pass for "limit" and
// {"expected_version":1,"Expected_Version":5} would silently become 5. The
// protocol's field names are exact: keyChecker walks the raw body once,
// without allocating, and refuses any key that is not spelled exactly.

// fieldSet names the exact keys a request type accepts: its top-level keys,
// and for top-level keys holding an array of objects, those objects' keys.
type fieldSet struct {
	top    []string
	arrays map[string][]string
}

// exactFields is implemented by the request types that Decode checks.
type exactFields interface{ fields() fieldSet }

func (*AppendRequest) fields() fieldSet {
	return fieldSet{
		top:    []string{"events", "expected_version", "idempotency_key"},
		arrays: map[string][]string{"events": {"type", "data"}},
	}
}
func (*QueryRequest) fields() fieldSet {
	return fieldSet{top: []string{"query", "params", "limit", "cursor", "after", "wait_ms"}}
}
func (*SkipRequest) fields() fieldSet    { return fieldSet{top: []string{"position"}} }
func (*ReadRequest) fields() fieldSet    { return fieldSet{top: []string{"at_version", "at_time"}} }
func (*HistoryRequest) fields() fieldSet { return fieldSet{top: []string{"from_version", "limit"}} }

// checkKeys assumes body is valid JSON (the decoder has already said so).
func checkKeys(body []byte, fs fieldSet) error {
	type frame struct {
		object    bool
		expectKey bool
		key       string // for depth-1 objects: the key whose value is open
		allowed   []string
	}
	var stack []frame
	var lastTopKey string
	for i := 0; i < len(body); i++ {
		c := body[i]
		switch c {
		case '{', '[':
			f := frame{object: c == '{', expectKey: c == '{'}
			depth := len(stack)
			switch {
			case depth == 0 && f.object:
				f.allowed = fs.top
			case depth == 2 && f.object && !stack[1].object && stack[0].object:
				// An object inside a top-level array: events[i].
				f.allowed = fs.arrays[stack[1].key]
				if f.allowed == nil {
					f.allowed = []string{} // checked by the decoder's types
					f.key = "-"
				}
			case depth == 1 && !f.object:
				f.key = lastTopKey
			}
			stack = append(stack, f)
		case '}', ']':
			stack = stack[:len(stack)-1]
		case ',':
			if n := len(stack); n > 0 && stack[n-1].object {
				stack[n-1].expectKey = true
			}
		case '"':
			start := i + 1
			for i++; i < len(body) && body[i] != '"'; i++ {
				if body[i] == '\\' {
					i++
				}
			}
			n := len(stack)
			if n == 0 || !stack[n-1].object || !stack[n-1].expectKey {
				continue
			}
			stack[n-1].expectKey = false
			f := stack[n-1]
			key := body[start:i]
			if n == 1 {
				lastTopKey = string(key)
			}
			if f.allowed == nil || f.key == "-" {
				continue
			}
			if !contains(f.allowed, key) {
				return Errorf(CodeBadRequest, "malformed request: unknown field %q (field names are exact: %v)", truncate(string(key)), f.allowed)
			}
		}
	}
	return nil
}

func contains(list []string, b []byte) bool {
	for _, x := range list {
		if x == string(b) { // no allocation: the compiler compares in place
			return true
		}
	}
	return false
}
