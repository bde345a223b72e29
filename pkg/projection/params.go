package projection

import (
	"bytes"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/kumadb/kuma/pkg/kuma"
)

// The parameters that event statements bind from the event itself. Any other
// :name in an event statement binds the top-level field name of the event
// data, so a data field with one of these names is reached only through
// json_extract(:data, ...).
const (
	ParamEntity   = "entity"   // TEXT, the entity id
	ParamVersion  = "version"  // INTEGER, the entity's version after the event
	ParamTime     = "time"     // TEXT, RFC 3339 in UTC with a fixed six-digit fraction, so it sorts as text
	ParamPosition = "position" // TEXT, the event's position
	ParamType     = "type"     // TEXT, the event type
	ParamData     = "data"     // TEXT, the event data as JSON
)

// ReservedParams returns the names event statements bind from the event
// itself rather than from its data, in documentation order. The slice is new
// on every call.
func ReservedParams() []string {
	return []string{ParamEntity, ParamVersion, ParamTime, ParamPosition, ParamType, ParamData}
}

// BindEvent returns the arguments for running st for ev, one sql.NamedArg per
// parameter, in the order of st.Params, ready for database/sql. See the
// package documentation for how each parameter is bound. The event data is
// decoded only when a parameter names one of its fields; data that is not a
// JSON object leaves every field NULL, and data that is not JSON at all is an
// error. A forget statement binds with an Event holding only the entity.
// BindEvent does not modify st and is safe for concurrent use.
func (st *Statement) BindEvent(ev Event) ([]any, error) {
	args := make([]any, len(st.Params))
	var (
		fields  map[string]json.RawMessage
		decoded bool
	)
	for i, name := range st.Params {
		var v any
		switch name {
		case ParamEntity:
			v = ev.Entity
		case ParamVersion:
			v = ev.Version
		case ParamTime:
			v = ev.Time.UTC().Format(TimeFormat)
		case ParamPosition:
			v = ev.Position
		case ParamType:
			v = ev.Type
		case ParamData:
			if len(ev.Data) > 0 {
				v = string(ev.Data)
			}
		default:
			if !decoded {
				var err error
				if fields, err = dataFields(ev.Data); err != nil {
					return nil, fmt.Errorf("projection: event %s of %s at %s: %w", ev.Type, ev.Entity, ev.Position, err)
				}
				decoded = true
			}
			if raw, ok := fields[name]; ok {
				var err error
				if v, err = sqlValue(raw, true); err != nil {
					return nil, fmt.Errorf("projection: event %s of %s at %s: field %s: %w", ev.Type, ev.Entity, ev.Position, name, err)
				}
			}
		}
		args[i] = sql.Named(name, v)
	}
	return args, nil
}

// dataFields decodes the top-level members of event data, keeping each value
// raw so that numbers are converted exactly later. Data that is not an
// object has no fields.
func dataFields(data json.RawMessage) (map[string]json.RawMessage, error) {
	d := bytes.TrimLeft(data, " \t\r\n")
	if len(d) == 0 {
		return nil, nil
	}
	if d[0] != '{' {
		if !json.Valid(d) {
			return nil, errors.New("data is not valid JSON")
		}
		return nil, nil
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(d, &fields); err != nil {
		return nil, fmt.Errorf("data: %w", err)
	}
	return fields, nil
}

// maxListed bounds how many unknown parameters one error names, since the
// request is untrusted.
const maxListed = 5

// BindQuery returns the arguments for running the query st with the request
// parameters params, one sql.NamedArg per parameter, in the order of
// st.Params. A parameter the query uses but the request lacks, a request key
// the query does not use, and an object or array value are bad_request
// protocol errors ([kuma.CodeBadRequest]) naming the parameter. BindQuery does
// not modify st and is safe for concurrent use.
func (st *Statement) BindQuery(params map[string]json.RawMessage) ([]any, error) {
	var problems, unknown []string
	for _, name := range st.Params {
		if _, ok := params[name]; !ok {
			problems = append(problems, fmt.Sprintf("missing parameter %q", name))
		}
	}
	for name := range params {
		if !contains(st.Params, name) {
			unknown = append(unknown, name)
		}
	}
	slices.Sort(unknown)
	for i, name := range unknown {
		if i == maxListed {
			problems = append(problems, fmt.Sprintf("%d more unknown parameters", len(unknown)-maxListed))
			break
		}
		p := fmt.Sprintf("unknown parameter %q", clip(name))
		if len(name) <= 64 {
			if near := closest(name, st.Params); near != "" {
				p += fmt.Sprintf(" (did you mean %q?)", near)
			}
		}
		problems = append(problems, p)
	}
	if len(problems) > 0 {
		takes := "no parameters"
		if len(st.Params) > 0 {
			takes = strings.Join(st.Params, ", ")
		}
		return nil, kuma.Errorf(kuma.CodeBadRequest, "%s; the query takes %s", strings.Join(problems, "; "), takes)
	}
	args := make([]any, len(st.Params))
	for i, name := range st.Params {
		v, err := sqlValue(params[name], false)
		if err != nil {
			return nil, kuma.Errorf(kuma.CodeBadRequest, "parameter %q %v", name, err)
		}
		args[i] = sql.Named(name, v)
	}
	return args, nil
}

// clip keeps untrusted names from filling error messages.
func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}

// sqlValue converts one JSON value to what SQLite stores for it: a string to
// TEXT, a whole number that fits to INTEGER, another number to REAL, a
// boolean to 1 or 0 and null to NULL. An object or array becomes its compact
// JSON text when composite is set and is refused otherwise.
func sqlValue(raw json.RawMessage, composite bool) (any, error) {
	v := bytes.TrimSpace(raw)
	if len(v) == 0 {
		return nil, errors.New("is not valid JSON")
	}
	switch v[0] {
	case '"':
		var s string
		if err := json.Unmarshal(v, &s); err != nil {
			return nil, errors.New("is not valid JSON")
		}
		return s, nil
	case '{', '[':
		if !composite {
			return nil, errors.New("must be a string, number, boolean or null")
		}
		var b bytes.Buffer
		if err := json.Compact(&b, v); err != nil {
			return nil, errors.New("is not valid JSON")
		}
		return b.String(), nil
	}
	switch string(v) {
	case "true":
		return int64(1), nil
	case "false":
		return int64(0), nil
	case "null":
		return nil, nil
	}
	if !json.Valid(v) {
		return nil, errors.New("is not valid JSON")
	}
	return jsonNumber(string(v)), nil
}

// jsonNumber converts a valid JSON number without losing precision: a whole
// number that fits in int64 becomes int64, however it is written (12, 1.2e1,
// 12.0), and anything else float64. Going through float64 first would turn
// 9007199254740993 into 9007199254740992.
func jsonNumber(s string) any {
	if i, err := strconv.ParseInt(s, 10, 64); err == nil {
		return i
	}
	if i, ok := wholeNumber(s); ok {
		return i
	}
	// A valid JSON number only fails to parse by being out of range, and
	// then ParseFloat returns the infinity SQLite stores.
	f, _ := strconv.ParseFloat(s, 64)
	return f
}

// wholeNumber returns the value of a JSON number written with a fraction or
// an exponent when that value is a whole number within int64.
func wholeNumber(s string) (int64, bool) {
	sign := ""
	if strings.HasPrefix(s, "-") {
		sign, s = "-", s[1:]
	}
	mant, exp := s, 0
	if i := strings.IndexAny(s, "eE"); i >= 0 {
		e, err := strconv.Atoi(s[i+1:])
		// Beyond ±1000 the value is far outside int64 or far below 1;
		// bounding it also keeps the arithmetic below from overflowing.
		if err != nil || e < -1000 || e > 1000 {
			return 0, false
		}
		mant, exp = s[:i], e
	}
	whole, frac, _ := strings.Cut(mant, ".")
	digits := strings.TrimLeft(whole+frac, "0")
	exp -= len(frac)
	for strings.HasSuffix(digits, "0") {
		digits = digits[:len(digits)-1]
		exp++
	}
	if digits == "" {
		return 0, true
	}
	// int64 has at most 19 digits.
	if exp < 0 || len(digits)+exp > 19 {
		return 0, false
	}
	i, err := strconv.ParseInt(sign+digits+strings.Repeat("0", exp), 10, 64)
	return i, err == nil
}

// TimeFormat is how :time is bound: RFC 3339 in UTC with a fixed
// microsecond fraction (Kuma's time precision), so that times compare and
// sort correctly as text.
const TimeFormat = "2006-01-02T15:04:05.000000Z"
